//! `liederiv eval`: loss, accuracy and LEE per split for a checkpoint (or the config's initial
//! weights), optionally one CSV row of logits per image.

use super::EvalArgs;
use crate::config::Config;
use crate::lie::LeeSpec;
use crate::report::EvalRecord;
use crate::train::evaluate::{angle_curve, evaluate, logits_of};
use anyhow::Context;
use std::collections::BTreeMap;

pub fn run(args: &EvalArgs, cfg: &Config) -> anyhow::Result<()> {
    let device = crate::runtime::select_device(&cfg.device)?;
    if let (true, Some(ckpt)) = (args.as_run, &args.checkpoint) {
        return as_run(cfg, ckpt, &device);
    }
    let splits_wanted = if args.splits.is_empty() {
        cfg.eval.splits.clone()
    } else {
        args.splits.clone()
    };
    let limit = args.limit.unwrap_or(0);
    let mut splits = BTreeMap::new();
    for name in &splits_wanted {
        let s = crate::data::load_split(cfg, name).with_context(|| format!("loading split {name:?}"))?;
        splits.insert(name.clone(), s);
    }
    let loaded = crate::train::load_for_inference(cfg, args.checkpoint.as_deref(), &device)?;
    eprintln!("eval: measuring {}", loaded.source);
    let model = crate::models::frozen(cfg, &loaded.varmap, &device)?;
    let spec = LeeSpec::of(&cfg.lee);
    let metrics = evaluate(
        model.as_ref(),
        cfg,
        &splits,
        &splits_wanted,
        &splits_wanted,
        limit,
        &spec,
        &device,
    )?;
    let record = EvalRecord {
        step: 0,
        epoch: 0.0,
        lr: 0.0,
        train_loss: None,
        images_per_sec: 0.0,
        splits: metrics,
    };
    print!("{}", crate::report::eval_table(&record));
    let mut points = Vec::new();
    if let Some(super::Angles(degrees)) = &args.angles {
        for name in &splits_wanted {
            points.extend(angle_curve(
                model.as_ref(),
                cfg,
                &splits[name],
                limit,
                degrees,
                &device,
            )?);
        }
        print!("{}", crate::report::angles::angles_table(&points));
        let dir = cfg.run_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let csv = dir.join(crate::report::angles::ANGLES_CSV);
        crate::report::angles::write_angles(&csv, &loaded.source, &points)?;
        let series: Vec<_> = splits_wanted
            .iter()
            .map(|name| crate::report::angles::series_of(&points, name, name))
            .collect();
        crate::report::plot_angles(&dir.join("angles"), &series)?;
        println!(
            "wrote {} and {}.{{png,svg}}",
            csv.display(),
            dir.join("angles").display()
        );
    }
    if let Some(path) = &args.json {
        let mut doc = serde_json::to_value(&record.splits)?;
        if args.angles.is_some() {
            // Beside the splits (no split is named "angles"): the rows of angles.csv.
            doc["angles"] = points
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "split": p.split,
                        "degrees": p.degrees,
                        "n": p.n,
                        "error": p.error,
                        "true_class_prob": p.true_prob,
                    })
                })
                .collect();
        }
        let text = serde_json::to_string_pretty(&doc)?;
        crate::report::write_atomic(path, text.as_bytes())?;
    }
    if let Some(path) = &args.predictions {
        let mut csv = String::from("split,index,label,predicted");
        for k in 0..cfg.model.num_classes {
            csv += &format!(",logit_{k}");
        }
        csv += "\n";
        for name in &splits_wanted {
            let (logits, labels) = logits_of(model.as_ref(), &splits[name], limit, cfg, &device)?;
            let logits = logits.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
            let labels = labels.to_vec1::<u32>()?;
            for (i, (row, label)) in logits.iter().zip(labels).enumerate() {
                let pred = row
                    .iter()
                    .enumerate()
                    .fold((0, f32::NEG_INFINITY), |b, (k, &v)| if v > b.1 { (k, v) } else { b })
                    .0;
                csv += &format!("{name},{i},{label},{pred}");
                for v in row {
                    csv += &format!(",{v}");
                }
                csv += "\n";
            }
        }
        crate::report::write_atomic(path, csv.as_bytes())
            .with_context(|| format!("writing predictions {}", path.display()))?;
    }
    Ok(())
}

/// `eval --as-run`: the checkpoint's final evaluation, written as the config's run folder.
fn as_run(cfg: &Config, ckpt: &std::path::Path, device: &candle_core::Device) -> anyhow::Result<()> {
    let dir = cfg.run_dir();
    if dir.exists() {
        anyhow::bail!(
            "eval --as-run: {} already exists; nothing in it was changed. Evaluate into a new run \
             folder (`--set name=<another name>`) or delete that one",
            dir.display()
        );
    }
    let started = std::time::Instant::now();
    let meta = crate::train::checkpoint::load_meta(ckpt)?;
    let mut splits = BTreeMap::new();
    for name in cfg.eval.splits.iter().chain(&cfg.lee.splits) {
        if !splits.contains_key(name) {
            let s = crate::data::load_split(cfg, name).with_context(|| format!("loading split {name:?}"))?;
            splits.insert(name.clone(), s);
        }
    }
    let loaded = crate::train::load_for_inference(cfg, Some(ckpt), device)?;
    eprintln!("eval --as-run: measuring {}", loaded.source);
    let model = crate::models::frozen(cfg, &loaded.varmap, device)?;
    let spec = LeeSpec::of(&cfg.lee);
    let metrics = evaluate(
        model.as_ref(),
        cfg,
        &splits,
        &cfg.eval.splits,
        &cfg.lee.splits,
        0,
        &spec,
        device,
    )?;
    let record = EvalRecord {
        step: meta.step,
        epoch: meta.epoch as f64,
        lr: 0.0,
        train_loss: None,
        images_per_sec: 0.0,
        splits: metrics,
    };
    print!("{}", crate::report::eval_table(&record));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    crate::report::write_atomic(&dir.join(crate::report::CONFIG_TOML), cfg.to_toml().as_bytes())?;
    crate::report::MetricsLog::create(&dir)?.append(&record)?;
    let summary = crate::report::RunSummary {
        params: Some(loaded.varmap.all_vars().iter().map(|v| v.elem_count()).sum()),
        wall_time_s: Some(started.elapsed().as_secs_f64()),
        seed: Some(cfg.seed),
    };
    crate::report::write_atomic(
        &dir.join(crate::report::SUMMARY_JSON),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    println!(
        "wrote the run folder {} (step {} of {})",
        dir.display(),
        meta.step,
        ckpt.display()
    );
    Ok(())
}
