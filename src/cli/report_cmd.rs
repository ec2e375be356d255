//! `liederiv report <run-dir>... [--markdown FILE] [--paper FILE]`: read finished (or running)
//! runs, draw each run's training curves into its directory, print the table of final metrics
//! (with `--paper`, the published numbers beside them, the published table after them and the
//! file's `[[comparison]]`s as differences over seeds with 95% intervals), and with `--markdown`
//! write the tables, the error-vs-LEE comparison plots and each row's LEE curves over its seeds
//! beside it.

use crate::cli::ReportArgs;
use crate::report::stats::{mean, sample_std};
use crate::report::{
    self, comparison_table, load_run, markdown_table, paper_table, rows_of, seed_table, PaperNumbers, RowPoint,
    RunReport, ScatterPoint, COMPARED_TRANSFORM,
};
use anyhow::Context;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

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
        if let Some(differences) = comparison_table(&runs, &p.comparison) {
            table += &format!(
                "\nDifferences over seeds (95% t intervals): mean of row a − mean of row b over their \
                 runs with Welch's interval, or, where a − b says \"paired by seed\", the mean of the \
                 per-seed differences with the paired interval; for the final test error and the final \
                 test {COMPARED_TRANSFORM} LEE; \"excludes 0\" marks a difference significant at the 5% \
                 level.\n\n"
            );
            table += &differences;
        }
    }
    print!("{table}");
    if let Some(md) = &args.markdown {
        if let Some(parent) = md.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        report::write_atomic(md, table.as_bytes()).with_context(|| format!("writing {}", md.display()))?;
        eprintln!("wrote {}", md.display());
        comparison_plots(md, &runs)?;
        row_lee_plots(md, &runs)?;
        angle_overlay(md, &runs)?;
    }
    Ok(())
}

/// `<markdown stem>_<suffix>` beside the markdown file.
fn beside(md: &Path, suffix: &str) -> PathBuf {
    md.with_file_name(format!(
        "{}_{suffix}",
        md.file_stem().and_then(|s| s.to_str()).unwrap_or("report")
    ))
}

/// One error-vs-LEE scatter per transform measured on the test split, named
/// `<markdown stem>_error_vs_lee_<transform>` beside the markdown file: one marker per row with
/// bars over its seeds when some row has several runs (labels per run would pile up), one
/// labelled point per run otherwise. Runs without a test error or without that transform are
/// left out of that plot.
fn comparison_plots(md: &Path, runs: &[RunReport]) -> anyhow::Result<()> {
    let transforms: BTreeSet<&String> = runs
        .iter()
        .filter_map(|r| r.last().splits.get("test"))
        .flat_map(|s| s.lee.keys())
        .collect();
    let rows = rows_of(runs);
    let over_seeds = rows.iter().any(|(_, members)| members.len() > 1);
    for t in transforms {
        let path = beside(md, &format!("error_vs_lee_{t}"));
        // (test error, test LEE) of each run that has both.
        let measured = |r: &RunReport| Some((r.test_error_pct()?, r.test_lee(t)?));
        if over_seeds {
            let points: Vec<RowPoint> = rows
                .iter()
                .filter_map(|(row, members)| {
                    let (errors, lees): (Vec<f64>, Vec<f64>) = members.iter().filter_map(|r| measured(r)).unzip();
                    (!errors.is_empty()).then(|| RowPoint {
                        row: row.clone(),
                        seeds: errors.len(),
                        test_error_pct: mean(&errors),
                        test_error_std: sample_std(&errors).unwrap_or(0.0),
                        lee: mean(&lees),
                        lee_std: sample_std(&lees).unwrap_or(0.0),
                    })
                })
                .collect();
            if points.is_empty() {
                continue;
            }
            report::plot_rows_error_vs_lee(&path, t, &points)
                .with_context(|| format!("plotting {}", path.display()))?;
        } else {
            let points: Vec<ScatterPoint> = runs
                .iter()
                .filter_map(|r| {
                    let (test_error_pct, _) = measured(r)?;
                    let lee = r.last().splits.get("test")?.lee.get(t)?;
                    Some(ScatterPoint {
                        label: r.name.clone(),
                        test_error_pct,
                        lee: lee.mean,
                        lee_stderr: lee.stderr,
                    })
                })
                .collect();
            if points.is_empty() {
                continue;
            }
            report::plot_error_vs_lee(&path, t, &points).with_context(|| format!("plotting {}", path.display()))?;
        }
        eprintln!("wrote {}.{{png,svg}}", path.display());
    }
    Ok(())
}

/// Per row, `<markdown stem>_lee_<row>`: its rotation LEE over training on every split that
/// measured it, mean over the row's seeds with their min–max band.
fn row_lee_plots(md: &Path, runs: &[RunReport]) -> anyhow::Result<()> {
    for (row, members) in rows_of(runs) {
        let path = beside(md, &format!("lee_{row}"));
        let seeds: Vec<&[report::EvalRecord]> = members.iter().map(|r| r.records.as_slice()).collect();
        if report::plot_row_lee(&path, &row, COMPARED_TRANSFORM, &seeds)
            .with_context(|| format!("plotting {}", path.display()))?
        {
            eprintln!("wrote {}.{{png,svg}}", path.display());
        }
    }
    Ok(())
}

/// The test-split angle curves of the runs that have an `angles.csv` (`liederiv eval
/// --angles`), overlaid in `<markdown stem>_angles.{png,svg}`: one curve per run, or per row the
/// mean over its seeds when a row has several (Table 1's 7 rows × 3 seeds would be 21 curves).
fn angle_overlay(md: &Path, runs: &[RunReport]) -> anyhow::Result<()> {
    let mut series = Vec::new();
    for (row, members) in rows_of(runs) {
        let mut curves = Vec::new();
        for r in members {
            let path = r.dir.join(report::angles::ANGLES_CSV);
            if !path.exists() {
                continue;
            }
            let s = report::angles::series_of(&report::angles::read_angles(&path)?, "test", &r.name);
            if !s.1.is_empty() {
                curves.push(s);
            }
        }
        match curves.len() {
            0 => {}
            1 => series.append(&mut curves),
            k => series.push(report::angles::mean_series(&format!("{row} (mean of {k})"), &curves)),
        }
    }
    if series.is_empty() {
        return Ok(());
    }
    let stem = beside(md, "angles");
    report::plot_angles(&stem, &series)?;
    eprintln!("wrote {}.{{png,svg}}", stem.display());
    Ok(())
}
