//! `liederiv train`: run the configured stages (see `crate::train::engine`), then print the
//! final accuracy and LEE table.

use super::TrainArgs;
use crate::config::Config;
use crate::report::EvalRecord;
use anyhow::Context;

pub fn run(args: &TrainArgs, cfg: &Config) -> anyhow::Result<()> {
    let summary = crate::train::train(cfg, args.resume).with_context(|| format!("training run {:?}", cfg.name))?;
    if let Some(last) = &summary.last {
        print!("{}", final_table(last));
    }
    println!("run directory: {}", summary.run_dir.display());
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
        out += &format!(
            "| {name} | {} | {} | {} |",
            m.n,
            opt(m.loss, false),
            opt(m.accuracy, true)
        );
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
