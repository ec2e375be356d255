//! `liederiv lee`: the local equivariance error (paper Eq. 4) of a model on each split, as a
//! table split × transform (mean ± stderr, plus accuracy) and, with `--json`, the schema
//! `{"model", "checkpoint", "stencil", "statistic", "splits": {"test": {"n", "accuracy",
//! "lee": {"rotate": {"mean", "stderr"}, ...}, "metrics": {...}}, ...}, "layerwise": {...}}`.
//!
//! `--layerwise` decomposes each transform's Lie derivative over the network's steps (Eq. 6,
//! Figure 4) on the first split: a table, a `"layerwise"` JSON key and a CSV. `--metrics` adds
//! the alternative metrics of `lie::metrics`. The numbers come from `crate::lie`; this file only
//! resolves the flags, loops over batches and prints / writes.

use crate::cli::LeeArgs;
use crate::config::Config;
use crate::data;
use crate::lie::{
    decompose, LayerwiseAccumulator, LayerwiseReport, LeeAccumulator, LeeSpec, LeeSummary, Metric, MetricStat,
    MetricsAccumulator,
};
use crate::models::{frozen, Rng};
use anyhow::{bail, Context};
use rand::SeedableRng;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

/// What to measure: the `[lee]` section (its flags are overrides of it, applied when the config
/// was resolved) and the metrics.
#[derive(Debug)]
struct Options {
    spec: LeeSpec,
    splits: Vec<String>,
    limit: usize,
    metrics: Vec<Metric>,
}

fn resolve(cfg: &Config, args: &LeeArgs) -> anyhow::Result<Options> {
    let l = &cfg.lee;
    if l.transforms.is_empty() {
        bail!("no transforms to measure: pass --transforms rotate,translate_x,... or set lee.transforms");
    }
    let mut metrics = Vec::new();
    for name in &args.metrics {
        match Metric::parse(name) {
            Some(m) => metrics.push(m),
            None if name == "lee" => {} // always measured
            None => {
                bail!("--metrics: unknown metric {name:?}; expected lee, consistency, eq_t, eq_t_frac, eq_r or sample")
            }
        }
    }
    Ok(Options {
        spec: LeeSpec::of(l),
        splits: l.splits.clone(),
        limit: l.limit,
        metrics,
    })
}

/// Everything measured on one split.
struct SplitResult {
    name: String,
    summary: LeeSummary,
    metrics: Vec<MetricStat>,
}

pub fn run(cfg: &Config, args: &LeeArgs) -> anyhow::Result<()> {
    let opts = resolve(cfg, args)?;
    let device = crate::runtime::select_device(&cfg.device)?;
    let loaded = crate::train::load_for_inference(cfg, args.checkpoint.as_deref(), &device)?;
    eprintln!("lee: measuring {}", loaded.source);
    // Everything here is forward mode (the layerwise decomposition too): no autograd graph needed.
    let model = frozen(cfg, &loaded.varmap, &device)?;
    let mut rng = Rng::seed_from_u64(cfg.seed);
    let bs = opts.spec.batch_size.max(1);
    let mut results = Vec::new();
    let mut layerwise: Vec<LayerwiseReport> = Vec::new();
    for (si, name) in opts.splits.iter().enumerate() {
        let split = data::load_split(cfg, name).with_context(|| format!("loading split {name}"))?;
        let n = if opts.limit == 0 {
            split.len()
        } else {
            opts.limit.min(split.len())
        };
        let mut lee = LeeAccumulator::new(&opts.spec.transforms);
        let mut metrics = MetricsAccumulator::new(&opts.metrics, cfg.lee.metric_draws);
        // Figure 4 is one split's picture: the layerwise decomposition runs on the first.
        let mut lw: Vec<LayerwiseAccumulator> = if args.layerwise && si == 0 {
            opts.spec
                .transforms
                .iter()
                .map(|&t| LayerwiseAccumulator::new(t, cfg.lee.layerwise_probes))
                .collect()
        } else {
            Vec::new()
        };
        for start in (0..n).step_by(bs) {
            let idx: Vec<usize> = (start..n.min(start + bs)).collect();
            let (x, y) = data::batch(&split, &idx, &cfg.data, &device)?;
            lee.push(model.as_ref(), &x, Some(&y), &opts.spec)
                .with_context(|| format!("LEE on split {name}"))?;
            if !opts.metrics.is_empty() {
                metrics.push(model.as_ref(), &x, &mut rng)?;
            }
            for acc in &mut lw {
                let d = decompose(
                    model.as_ref(),
                    &x,
                    acc.transform(),
                    opts.spec.stencil,
                    opts.spec.use_logits,
                )?;
                acc.push(&d, &mut rng)?;
            }
        }
        layerwise.extend(lw.into_iter().map(|a| a.finish()));
        results.push(SplitResult {
            name: name.clone(),
            summary: lee.finish(),
            metrics: metrics.finish(),
        });
    }
    print!("{}", lee_table(&opts.spec, &results));
    for rep in &layerwise {
        print!("{}", layerwise_table(rep));
    }
    let doc = to_json(
        cfg,
        loaded.checkpoint.as_deref(),
        &opts.spec,
        &results,
        &layerwise,
        opts.splits.first(),
    );
    if let Some(path) = &args.json {
        write_atomic(path, serde_json::to_string_pretty(&doc)?.as_bytes())?;
        println!("wrote {}", path.display());
    }
    if !layerwise.is_empty() {
        let csv = match &args.json {
            Some(p) => p.with_extension("layerwise.csv"),
            None => cfg.run_dir().join("lee_layerwise.csv"),
        };
        write_atomic(&csv, layerwise_csv(&layerwise).as_bytes())?;
        println!("wrote {}", csv.display());
        // Figure 4: cumulative share by step, one line per transform (steps are the same).
        let stem = csv.with_extension("");
        let names: Vec<String> = layerwise[0].steps.iter().map(|s| s.step.clone()).collect();
        let lines: Vec<(String, Vec<f64>)> = layerwise
            .iter()
            .map(|r| {
                (
                    r.transform.name().to_string(),
                    r.steps.iter().map(|s| s.contribution).collect(),
                )
            })
            .collect();
        crate::report::plot_layerwise(&stem, &lines, &names)?;
        println!("wrote {}.png and .svg", stem.display());
    }
    Ok(())
}

/// Split × transform: mean ± stderr, plus accuracy; then any metrics.
fn lee_table(spec: &LeeSpec, results: &[SplitResult]) -> String {
    let mut s = format!(
        "LEE ({}, {} stencil{}), mean ± stderr over images\n{:<14}{:>7}{:>9}",
        spec.statistic.name(),
        spec.stencil.name(),
        if spec.use_logits { ", logits" } else { "" },
        "split",
        "n",
        "acc"
    );
    for t in &spec.transforms {
        s += &format!("{:>24}", t.name());
    }
    s.push('\n');
    for r in results {
        let acc = r.summary.accuracy.map_or("-".to_string(), |a| format!("{a:.4}"));
        s += &format!("{:<14}{:>7}{:>9}", r.name, r.summary.n, acc);
        for (_, m) in &r.summary.lee {
            s += &format!("{:>24}", format!("{:.3e} ± {:.1e}", m.mean(), m.stderr()));
        }
        s.push('\n');
    }
    for r in results.iter().filter(|r| !r.metrics.is_empty()) {
        s += &format!("metrics on {} ({} images)\n", r.name, r.summary.n);
        for m in &r.metrics {
            s += &format!(
                "  {:<18}{:.4e} ± {:.1e}  ({} draws/image)\n",
                m.name,
                m.stat.mean(),
                m.stat.stderr(),
                m.draws
            );
        }
    }
    s
}

fn layerwise_table(rep: &LayerwiseReport) -> String {
    let mut s = format!(
        "layerwise {} ({} images, {}): end-to-end {:.3e}, sum rel error {:.1e}\n{:>4}  {:<28}{:<12}{:>12}{:>8}{:>8}{:>12}{:>12}\n",
        rep.transform,
        rep.n,
        if rep.probes == 0 { "exact".to_string() } else { format!("{} probes", rep.probes) },
        rep.end_to_end,
        rep.sum_rel_error,
        "i",
        "step",
        "kind",
        "‖c‖²/K",
        "share",
        "cum",
        "EQ-Tf/N",
        "EQ-Tf/√N"
    );
    for st in &rep.steps {
        s += &format!(
            "{:>4}  {:<28}{:<12}{:>12.3e}{:>7.1}%{:>7.1}%{:>12.3e}{:>12.3e}\n",
            st.index,
            st.step,
            serde_json::to_value(st.kind)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            st.contribution,
            100.0 * st.share,
            100.0 * st.cumulative,
            st.eq_t_frac_n,
            st.eq_t_frac_sqrt_n
        );
    }
    s
}

fn layerwise_csv(reps: &[LayerwiseReport]) -> String {
    let mut s = String::from("transform,index,step,kind,contribution,share,cumulative,eq_t_frac_n,eq_t_frac_sqrt_n\n");
    for rep in reps {
        for st in &rep.steps {
            let kind = serde_json::to_value(st.kind)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default();
            s += &format!(
                "{},{},{},{},{:e},{:e},{:e},{:e},{:e}\n",
                rep.transform,
                st.index,
                st.step,
                kind,
                st.contribution,
                st.share,
                st.cumulative,
                st.eq_t_frac_n,
                st.eq_t_frac_sqrt_n
            );
        }
    }
    s
}

fn to_json(
    cfg: &Config,
    checkpoint: Option<&Path>,
    spec: &LeeSpec,
    results: &[SplitResult],
    layerwise: &[LayerwiseReport],
    layerwise_split: Option<&String>,
) -> Value {
    let mut splits = Map::new();
    for r in results {
        let lee: Map<String, Value> = r
            .summary
            .lee
            .iter()
            .map(|(t, m)| (t.name().to_string(), json!({"mean": m.mean(), "stderr": m.stderr()})))
            .collect();
        let mut entry = json!({"n": r.summary.n, "accuracy": r.summary.accuracy, "lee": lee});
        if !r.metrics.is_empty() {
            let metrics: Map<String, Value> = r
                .metrics
                .iter()
                .map(|m| {
                    let v =
                        json!({"mean": m.stat.mean(), "stderr": m.stat.stderr(), "n": m.stat.n(), "draws": m.draws});
                    (m.name.clone(), v)
                })
                .collect();
            entry["metrics"] = Value::Object(metrics);
        }
        splits.insert(r.name.clone(), entry);
    }
    let mut doc = json!({
        "model": cfg.model.kind,
        "checkpoint": checkpoint.map(|p| p.display().to_string()),
        "stencil": spec.stencil.name(),
        "statistic": spec.statistic.name(),
        "use_logits": spec.use_logits,
        "splits": splits,
    });
    if !layerwise.is_empty() {
        let lw: Map<String, Value> = layerwise
            .iter()
            .map(|rep| {
                let steps: Vec<Value> = rep
                    .steps
                    .iter()
                    .map(|st| {
                        json!({"index": st.index, "step": st.step, "kind": st.kind, "contribution": st.contribution,
                               "share": st.share, "cumulative": st.cumulative, "eq_t_frac_n": st.eq_t_frac_n,
                               "eq_t_frac_sqrt_n": st.eq_t_frac_sqrt_n})
                    })
                    .collect();
                let v = json!({"steps": steps, "sum_rel_error": rep.sum_rel_error, "end_to_end": rep.end_to_end,
                               "n": rep.n, "probes": rep.probes});
                (rep.transform.name().to_string(), v)
            })
            .collect();
        doc["layerwise"] = Value::Object(lw);
        doc["layerwise_split"] = json!(layerwise_split);
    }
    doc
}

/// Write via a temporary file in the same directory and a rename (readers never see half a file).
fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map_or(PathBuf::from("."), Path::to_path_buf);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating directory {}", dir.display()))?;
    Ok(crate::report::write_atomic(path, bytes)?)
}
