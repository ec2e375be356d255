//! `liederiv train`: run the configured stages (see `crate::train::engine`), then print the
//! final accuracy and LEE table, write `summary.json` and draw the training plots.

use super::TrainArgs;
use crate::config::Config;
use crate::report::{self, EvalRecord, RunSummary, METRICS_JSONL, SUMMARY_JSON};
use anyhow::Context;
use std::time::Instant;

pub fn run(args: &TrainArgs, cfg: &Config) -> anyhow::Result<()> {
    let start = Instant::now();
    let summary = crate::train::train(cfg, args.resume).with_context(|| format!("training run {:?}", cfg.name))?;
    if let Some(last) = &summary.last {
        print!("{}", final_table(last));
    }
    let dir = &summary.run_dir;
    let (varmap, _) = crate::models::build_model(cfg, &candle_core::Device::Cpu)?;
    let params = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
    // On --resume the wall time covers this invocation only.
    let run_summary = RunSummary {
        params: Some(params),
        wall_time_s: Some(start.elapsed().as_secs_f64()),
        seed: Some(cfg.seed),
    };
    report::write_atomic(
        &dir.join(SUMMARY_JSON),
        serde_json::to_string_pretty(&run_summary)?.as_bytes(),
    )?;
    if cfg.output.plots {
        let records = report::read_jsonl(&dir.join(METRICS_JSONL))?;
        if !records.is_empty() {
            for p in report::plot_training(dir, &cfg.name, &records)? {
                println!("plot: {}", p.display());
            }
        }
    }
    println!("run directory: {}", dir.display());
    Ok(())
}

/// The closing table: one row per split (accuracy, loss, LEE mean ± stderr per transform).
pub fn final_table(r: &EvalRecord) -> String {
    let transforms: std::collections::BTreeSet<&String> = r.splits.values().flat_map(|m| m.lee.keys()).collect();
    let mut out = format!(
        "step {} (epoch {:.2}), {:.0} images/s\n| split | n | loss | accuracy |",
        r.step, r.epoch, r.images_per_sec
    );
    for t in &transforms {
        out += &format!(" LEE {t} |");
    }
    out += "\n|---|---|---|---|";
    out += &"---|".repeat(transforms.len());
    out += "\n";
    let opt = |v: Option<f64>, pct: bool| match v {
        Some(x) if pct => format!("{:.2}%", 100.0 * x),
        Some(x) => format!("{x:.4}"),
        None => "–".into(),
    };
    for (name, m) in &r.splits {
        // n counts the accuracy images; a LEE-only split shows its LEE subset size instead.
        let n = match m.n {
            0 => m
                .lee
                .values()
                .next()
                .map_or("–".to_string(), |v| format!("{} (LEE)", v.n)),
            n => n.to_string(),
        };
        out += &format!("| {name} | {n} | {} | {} |", opt(m.loss, false), opt(m.accuracy, true));
        for t in &transforms {
            match m.lee.get(*t) {
                Some(v) => out += &format!(" {:.3e} ± {:.1e} |", v.mean, v.stderr),
                None => out += " – |",
            }
        }
        out += "\n";
    }
    out
}
