//! `liederiv report <run-dir>... [--markdown FILE] [--paper FILE]`: read finished (or running)
//! runs, draw each run's training curves into its directory, print the table of final metrics
//! (with `--paper`, the published numbers beside them and the published table after them), and
//! with `--markdown` write the tables and the error-vs-LEE comparison plots beside it.

use crate::cli::ReportArgs;
use crate::report::{self, load_run, markdown_table, paper_table, seed_table, PaperNumbers, RunReport, ScatterPoint};
use anyhow::Context;
use std::collections::BTreeSet;
use std::path::Path;

pub fn run(args: &ReportArgs) -> anyhow::Result<()> {
    let runs: Vec<RunReport> = args
        .runs
        .iter()
        .map(|dir| load_run(dir).with_context(|| format!("cannot report on {}", dir.display())))
        .collect::<anyhow::Result<_>>()?;
    for r in &runs {
        let stems = report::plot_training(&r.dir, &r.name, &r.records)
            .with_context(|| format!("plotting run {}", r.dir.display()))?;
        for s in stems {
            eprintln!("wrote {}.{{png,svg}}", s.display());
        }
    }
    let paper = args
        .paper
        .as_deref()
        .map(PaperNumbers::load)
        .transpose()
        .context("reading the published numbers (--paper)")?;
    let mut table = String::new();
    if let Some(over_seeds) = seed_table(&runs, paper.as_ref()) {
        table += "Over seeds (each row's runs: test error mean ± sample std and range; LEE: mean ± std of the runs' means):\n\n";
        table += &over_seeds;
        table += "\nEvery run:\n\n";
    }
    table += &markdown_table(&runs, paper.as_ref());
    if let Some(p) = &paper {
        table += "\n";
        table += &paper_table(p, &runs);
    }
    print!("{table}");
    if let Some(md) = &args.markdown {
        if let Some(parent) = md.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        report::write_atomic(md, table.as_bytes()).with_context(|| format!("writing {}", md.display()))?;
        eprintln!("wrote {}", md.display());
        comparison_plots(md, &runs)?;
        angle_overlay(md, &runs)?;
    }
    Ok(())
}

/// One error-vs-LEE scatter per transform measured on the test split, named
/// `<markdown stem>_error_vs_lee_<transform>` beside the markdown file. Runs without a test
/// error or without that transform are left out of that plot.
fn comparison_plots(md: &Path, runs: &[RunReport]) -> anyhow::Result<()> {
    let transforms: BTreeSet<&String> = runs
        .iter()
        .filter_map(|r| r.last().splits.get("test"))
        .flat_map(|s| s.lee.keys())
        .collect();
    let stem = md.with_extension("");
    for t in transforms {
        let points: Vec<ScatterPoint> = runs
            .iter()
            .filter_map(|r| {
                let lee = r.last().splits.get("test")?.lee.get(t)?;
                Some(ScatterPoint {
                    label: r.name.clone(),
                    test_error_pct: r.test_error_pct()?,
                    lee: lee.mean,
                    lee_stderr: lee.stderr,
                })
            })
            .collect();
        if points.is_empty() {
            continue;
        }
        let path = stem.with_file_name(format!(
            "{}_error_vs_lee_{t}",
            stem.file_name().unwrap_or_default().to_string_lossy()
        ));
        report::plot_error_vs_lee(&path, t, &points).with_context(|| format!("plotting {}", path.display()))?;
        eprintln!("wrote {}.{{png,svg}}", path.display());
    }
    Ok(())
}

/// The test-split angle curves of every run that has an `angles.csv` (`liederiv eval
/// --angles`), overlaid in `<markdown stem>_angles.{png,svg}`.
fn angle_overlay(md: &Path, runs: &[RunReport]) -> anyhow::Result<()> {
    let mut series = Vec::new();
    for r in runs {
        let path = r.dir.join(report::angles::ANGLES_CSV);
        if !path.exists() {
            continue;
        }
        let s = report::angles::series_of(&report::angles::read_angles(&path)?, "test", &r.name);
        if !s.1.is_empty() {
            series.push(s);
        }
    }
    if series.is_empty() {
        return Ok(());
    }
    let stem = md.with_file_name(format!(
        "{}_angles",
        md.file_stem().and_then(|s| s.to_str()).unwrap_or("report")
    ));
    report::plot_angles(&stem, &series)?;
    eprintln!("wrote {}.{{png,svg}}", stem.display());
    Ok(())
}
