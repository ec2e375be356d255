//! A row's LEE over training across its seeds: the mean over seeds as a line, their min–max as a
//! band, one line per split.

use super::*;
use crate::report::stats::mean;
use std::collections::BTreeMap;

/// Per split (reading order), the `transform` LEE of a row's seeds aligned by step: at each step
/// that every seed evaluated, (step, mean over seeds, min, max). Runs of one config evaluate at
/// the same steps; a step some seed lacks (a run stopped early, another eval interval) is left
/// out rather than averaged over fewer seeds, and so is a split some seed never measured.
fn seed_bands(seeds: &[&[EvalRecord]], transform: &str) -> Vec<(String, Banded)> {
    let Some(first) = seeds.first() else {
        return Vec::new();
    };
    names_of(first)
        .0
        .into_iter()
        .filter_map(|split| {
            let per_seed: Vec<BTreeMap<usize, f64>> = seeds
                .iter()
                .map(|records| {
                    records
                        .iter()
                        .filter_map(|r| Some((r.step, r.splits.get(&split)?.lee.get(transform)?.mean)))
                        .collect()
                })
                .collect();
            let pts: Banded = per_seed[0]
                .keys()
                .filter_map(|step| {
                    let v: Vec<f64> = per_seed.iter().map(|m| m.get(step).copied()).collect::<Option<_>>()?;
                    let (lo, hi) = v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
                        (lo.min(x), hi.max(x))
                    });
                    Some((*step as f64, mean(&v), lo, hi))
                })
                .collect();
            (!pts.is_empty()).then_some((split, pts))
        })
        .collect()
}

/// A row's `transform` LEE over training as `<stem>.{png,svg}`: per split, the mean over the
/// row's seeds (`seeds`, each run's records) as a line and their min–max as a band, at the steps
/// every seed evaluated, from the first record on (step 0 when it was logged). Returns whether a
/// figure was written: nothing is when no split has that LEE at a step common to all seeds.
pub fn plot_row_lee(
    path_stem: &Path,
    row: &str,
    transform: &str,
    seeds: &[&[EvalRecord]],
) -> Result<bool, ReportError> {
    let series = seed_bands(seeds, transform);
    if series.is_empty() {
        return Ok(false);
    }
    let seeds_word = if seeds.len() == 1 { "seed" } else { "seeds" };
    let steps = series.iter().flat_map(|(_, pts)| pts.iter().map(|p| p.0 as usize));
    let figure = LeeFigure {
        title: format!("{row}: LEE over training, {} {seeds_word}", seeds.len()),
        y_desc: "LEE (mean over seeds, band min–max, log scale)",
        steps: step_range(steps),
        splits: series.iter().map(|(s, _)| s.clone()).collect(),
        panels: vec![(transform.to_string(), series)],
    };
    render(path_stem, &figure)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{MeanStderr, SplitMetrics};

    /// A record with rotate LEE `value` on each of `splits`.
    fn record(step: usize, splits: &[&str], value: f64) -> EvalRecord {
        EvalRecord {
            step,
            epoch: 0.0,
            lr: 1e-3,
            train_loss: None,
            images_per_sec: 1.0,
            splits: splits
                .iter()
                .map(|s| {
                    let lee = BTreeMap::from([(
                        "rotate".to_string(),
                        MeanStderr {
                            mean: value,
                            stderr: 0.0,
                            n: 8,
                        },
                    )]);
                    (
                        s.to_string(),
                        SplitMetrics {
                            n: 8,
                            lee,
                            ..Default::default()
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn seeds_are_aligned_by_step() {
        // Seed a has an extra eval at step 50 and an `ood_x` split seed b never measured.
        let a = [
            record(0, &["test", "train", "ood_x"], 1.0),
            record(50, &["test", "train"], 9.0),
            record(100, &["test", "train"], 0.5),
        ];
        let b = [record(0, &["train", "test"], 3.0), record(100, &["train", "test"], 0.1)];
        let bands = seed_bands(&[&a, &b], "rotate");
        let names: Vec<&str> = bands.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(names, ["train", "test"]);
        for (_, pts) in &bands {
            assert_eq!(pts, &[(0.0, 2.0, 1.0, 3.0), (100.0, 0.3, 0.1, 0.5)]);
        }
        // One seed: the band is the line itself.
        assert_eq!(seed_bands(&[&b], "rotate")[0].1[0], (0.0, 3.0, 3.0, 3.0));
        assert!(seed_bands(&[&a, &b], "translate_x").is_empty());
    }
}
