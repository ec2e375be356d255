//! `liederiv zoo`: every model of a zoo config measured on the same images
//! (`train::zoo`), then the per-model results, the table and the figures (`report::zoo`).
//! Without `--shard` it measures everything and merges; `--shard K/N` measures one share of the
//! units (a Slurm array task, scripts/zoo_slurm.sh); `--merge` writes the results from them.

use crate::cli::ZooArgs;
use crate::config::Config;
use crate::report::zoo::{write_zoo, zoo_table};
use crate::train::zoo::{merge, plan, run_shard, Shard};
use anyhow::Context;

pub fn run(args: &ZooArgs, cfg: &Config) -> anyhow::Result<()> {
    let path = args
        .cfg
        .config
        .as_deref()
        .context("liederiv zoo needs --config: a zoo config with [[zoo.models]] (see configs/zoo_example.toml)")?;
    let plan = plan(cfg, path, &args.cfg.overrides)?;
    eprintln!(
        "zoo: {} models × {} images of {} (units of {}) → {}",
        plan.entries.len(),
        plan.n_images,
        cfg.zoo.split,
        plan.batch,
        plan.out.display()
    );
    let shard = match &args.shard {
        Some(s) => Some(Shard::parse(s)?),
        None => None,
    };
    if !args.merge {
        let device = crate::runtime::select_device(&cfg.device)?;
        let (measured, skipped) = run_shard(&plan, shard.unwrap_or(Shard::ALL), &device, cfg.output.progress)?;
        eprintln!("zoo: measured {measured} units ({skipped} were already there)");
        if shard.is_some() {
            return Ok(());
        }
    }
    let results = merge(&plan)?;
    print!("{}", zoo_table(&results));
    for path in write_zoo(&plan.out, &results)? {
        println!("wrote {}", path.display());
    }
    Ok(())
}
