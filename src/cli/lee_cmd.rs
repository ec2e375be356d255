//! `liederiv lee`: the local equivariance error (paper Eq. 4) of a model on each split, as a
//! table split × transform (mean ± stderr, plus accuracy) and, with `--json`, the document of
//! `report::lee::LeeDoc`.
//!
//! `--layerwise` decomposes each transform's Lie derivative over the network's steps (Eq. 6,
//! Figure 4) on the first split: a table, a `"layerwise"` JSON key and a CSV. `--metrics` adds
//! the alternative metrics of `lie::metrics`, and `group` the hidden-layer C_N equivariance of
//! `lie::group`. The measuring is `train::evaluate::measure_split`,
//! the formatting `report::lee`; this file wires the flags to them.

use crate::cli::LeeArgs;
use crate::config::{Config, LeeOutput};
use crate::data;
use crate::lie::{LayerwiseReport, LeeSpec, Metric};
use crate::models::{frozen, Rng};
use crate::report::lee::{layerwise_csv, layerwise_table, lee_table, LeeDoc, SplitResult};
use crate::train::evaluate::measure_split;
use crate::train::evaluate::Extras;
use anyhow::{bail, Context};
use rand::SeedableRng;
use std::path::{Path, PathBuf};

/// What to measure: the `[lee]` section (its flags are overrides of it, applied when the config
/// was resolved) and the metrics.
#[derive(Debug)]
struct Options {
    spec: LeeSpec,
    splits: Vec<String>,
    limit: usize,
    metrics: Vec<Metric>,
    group: bool,
}

fn resolve(cfg: &Config, args: &LeeArgs) -> anyhow::Result<Options> {
    let l = &cfg.lee;
    if l.transforms.is_empty() {
        bail!("no transforms to measure: pass --transforms rotate,translate_x,... or set lee.transforms");
    }
    if args.layerwise && l.output == LeeOutput::Tokens {
        bail!(
            "--layerwise decomposes an invariant output (lee.output = probs, logits or features); tokens move with the image"
        );
    }
    let mut metrics = Vec::new();
    let mut group = false;
    for name in &args.metrics {
        match Metric::parse(name) {
            Some(m) => metrics.push(m),
            None if name == "lee" => {} // always measured
            None if name == "group" => group = true,
            None => {
                bail!(
                    "--metrics: unknown metric {name:?}; expected lee, consistency, eq_t, eq_t_frac, eq_r, sample or group"
                )
            }
        }
    }
    Ok(Options {
        spec: LeeSpec::of(l),
        splits: l.splits.clone(),
        limit: l.limit,
        metrics,
        group,
    })
}

pub fn run(cfg: &Config, args: &LeeArgs) -> anyhow::Result<()> {
    let opts = resolve(cfg, args)?;
    let device = crate::runtime::select_device(&cfg.device)?;
    let loaded = crate::train::load_for_inference(cfg, args.checkpoint.as_deref(), &device)?;
    eprintln!("lee: measuring {}", loaded.source);
    // Everything here is forward mode (the layerwise decomposition too): no autograd graph needed.
    let model = frozen(cfg, &loaded.varmap, &device)?;
    let mut rng = Rng::seed_from_u64(cfg.seed);
    let mut results = Vec::new();
    let mut layerwise: Vec<LayerwiseReport> = Vec::new();
    for (si, name) in opts.splits.iter().enumerate() {
        let split = data::load_split(cfg, name).with_context(|| format!("loading split {name}"))?;
        // Figure 4 is one split's picture: the layerwise decomposition runs on the first.
        let extras = Extras {
            metrics: opts.metrics.clone(),
            layerwise: args.layerwise && si == 0,
            group: opts.group,
        };
        let m = measure_split(
            model.as_ref(),
            cfg,
            &split,
            &opts.spec,
            opts.limit,
            &extras,
            &device,
            &mut rng,
        )
        .with_context(|| format!("LEE on split {name}"))?;
        layerwise.extend(m.layerwise);
        results.push(SplitResult {
            name: name.clone(),
            summary: m.lee,
            metrics: m.metrics,
            group: m.group,
        });
    }
    print!("{}", lee_table(&opts.spec, &results));
    for rep in &layerwise {
        print!("{}", layerwise_table(rep));
    }
    let doc = LeeDoc::new(
        cfg.model.kind,
        loaded.checkpoint.as_ref().map(|p| p.display().to_string()),
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

/// Write via a temporary file in the same directory and a rename (readers never see half a file).
fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map_or(PathBuf::from("."), Path::to_path_buf);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating directory {}", dir.display()))?;
    Ok(crate::report::write_atomic(path, bytes)?)
}
