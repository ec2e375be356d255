//! `liederiv train`: run the configured stages (see `crate::train::engine`), then print the
//! final accuracy and LEE table, write `summary.json` and draw the training plots.

use super::TrainArgs;
use crate::config::Config;
use crate::report::{self, RunSummary, METRICS_JSONL, SUMMARY_JSON};
use crate::train::Start;
use anyhow::Context;

pub fn run(args: &TrainArgs, cfg: &Config) -> anyhow::Result<()> {
    let start_mode = match (args.resume, args.overwrite) {
        (true, _) => Start::Resume,
        (_, true) => Start::Overwrite,
        _ => Start::New,
    };
    let summary = crate::train::train(cfg, start_mode).with_context(|| format!("training run {:?}", cfg.name))?;
    if let Some(last) = &summary.last {
        print!("{}{}", report::eval_heading(last), report::eval_table(last));
    }
    let dir = &summary.run_dir;
    let (varmap, _) = crate::models::build_model(cfg, &candle_core::Device::Cpu)?;
    let params = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
    let run_summary = RunSummary {
        params: Some(params),
        wall_time_s: summary.wall_time_s,
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
