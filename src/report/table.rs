//! The table of final metrics across runs (the shape of the paper's Table 1, plus what it could
//! not show: LEE per split and the test/OOD − train gaps). A run directory is read as the trainer
//! leaves it: `metrics.jsonl` (required), `config.toml` (for the run name) and `summary.json`
//! (parameters, wall time, seed; optional). Published numbers ([`PaperNumbers`], read from a
//! small TOML file) are printed beside ours in their own column and table, labelled as the
//! paper's, never mixed into our columns.

use super::stats::{mean, paired_interval, sample_std, welch_interval, DiffInterval};
use super::{read_jsonl, split_rank, EvalRecord, ReportError, METRICS_JSONL};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// File names the trainer writes beside the metrics.
pub const SUMMARY_JSON: &str = "summary.json";
pub const CONFIG_TOML: &str = "config.toml";

/// What the trainer records about a finished run, beyond the per-eval metrics. Unknown keys are
/// allowed so the trainer can add fields without breaking older reports.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct RunSummary {
    /// Trainable parameters of the model.
    pub params: Option<usize>,
    /// Wall-clock seconds of the whole run (its own pretraining included). A resumed run counts
    /// its earlier processes up to the checkpoint it resumed from; summaries written before the
    /// trainer carried that time count the last process only.
    pub wall_time_s: Option<f64>,
    /// The run's master seed.
    pub seed: Option<u64>,
}

/// One run as the report sees it.
#[derive(Clone, Debug)]
pub struct RunReport {
    /// `name` from config.toml, else the directory's name.
    pub name: String,
    pub dir: PathBuf,
    pub summary: RunSummary,
    /// Every eval, in order; the last one is the final result.
    pub records: Vec<EvalRecord>,
}

impl RunReport {
    pub fn last(&self) -> &EvalRecord {
        // load_run refuses runs without records, so there is always a last one.
        &self.records[self.records.len() - 1]
    }

    /// Images the final test accuracy was measured on (0 when it was not measured).
    pub fn test_images(&self) -> usize {
        self.last()
            .splits
            .get("test")
            .filter(|s| s.accuracy.is_some())
            .map_or(0, |s| s.n)
    }

    /// Final test error in percent, when test accuracy was measured.
    pub fn test_error_pct(&self) -> Option<f64> {
        self.last()
            .splits
            .get("test")
            .and_then(|s| s.accuracy)
            .map(|a| 100.0 * (1.0 - a))
    }

    /// Final test-split LEE mean for `transform`, when it was measured.
    pub fn test_lee(&self, transform: &str) -> Option<f64> {
        self.last().splits.get("test")?.lee.get(transform).map(|m| m.mean)
    }
}

/// Read a run directory; errors name the directory and say what is missing.
pub fn load_run(dir: &Path) -> Result<RunReport, ReportError> {
    let invalid = |message: String| ReportError::Invalid {
        what: format!("run directory {}", dir.display()),
        message,
    };
    if !dir.is_dir() {
        return Err(invalid(
            "does not exist or is not a directory; pass the run folder `<output.dir>/<name>`".into(),
        ));
    }
    let metrics = dir.join(METRICS_JSONL);
    if !metrics.is_file() {
        return Err(invalid(format!(
            "has no {METRICS_JSONL}; is it a run directory, and has the run reached its first eval?"
        )));
    }
    let records = read_jsonl(&metrics)?;
    if records.is_empty() {
        return Err(invalid(format!(
            "{METRICS_JSONL} is empty: the run has not logged an eval yet"
        )));
    }
    let summary_path = dir.join(SUMMARY_JSON);
    let summary = match std::fs::read_to_string(&summary_path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| ReportError::Json {
            path: summary_path.clone(),
            line: e.line(),
            source: e,
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => RunSummary::default(),
        Err(e) => return Err(ReportError::io(&summary_path, e)),
    };
    let name = run_name(dir);
    Ok(RunReport {
        name,
        dir: dir.to_path_buf(),
        summary,
        records,
    })
}

/// The `name` key of the run's saved config, read leniently (an old config that no longer
/// validates still names its run); the directory name otherwise.
fn run_name(dir: &Path) -> String {
    std::fs::read_to_string(dir.join(CONFIG_TOML))
        .ok()
        .and_then(|t| t.parse::<toml::Table>().ok())
        .and_then(|t| t.get("name").and_then(|v| v.as_str()).map(String::from))
        .unwrap_or_else(|| {
            dir.canonicalize()
                .unwrap_or_else(|_| dir.to_path_buf())
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| dir.display().to_string())
        })
}

/// `mean ± stderr` with three significant figures.
fn pm(mean: f64, stderr: f64) -> String {
    format!("{mean:.2e} ± {stderr:.1e}")
}

fn params(n: usize) -> String {
    match n {
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}k", n as f64 / 1e3),
        n => n.to_string(),
    }
}

fn wall(s: f64) -> String {
    if s >= 3600.0 {
        format!("{:.2} h", s / 3600.0)
    } else if s >= 60.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{s:.1} s")
    }
}

const MISSING: &str = "–";

/// One published result: the paper's name for the model, its test error, and the name of our run
/// that stands for it at our scale (none for the models we do not train).
#[derive(Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PaperRow {
    pub model: String,
    pub test_error_pct: f64,
    #[serde(default)]
    pub run: Option<String>,
}

/// A difference between two of our rows to test over seeds (`[[comparison]]` in the published
/// numbers' file, which is where the table's questions are written down): `a`, `b` are row names
/// as [`row_of`] gives them, `label` says what the difference asks.
#[derive(Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Comparison {
    pub a: String,
    pub b: String,
    pub label: String,
    /// Pair the runs of `a` and `b` by seed and take the paired t interval of the per-seed
    /// differences: for rows whose runs of one seed share what the seed decides (a fine-tuning of
    /// that seed's pretrained encoder), so the seed-to-seed spread cancels.
    #[serde(default)]
    pub paired: bool,
}

/// The published numbers of one table, e.g. the paper's Table 1 (`experiments/table1/paper.toml`):
/// `source = "..."`, one `[[row]]` per model, and optional `[[comparison]]` entries.
#[derive(Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PaperNumbers {
    /// Where the numbers come from (paper, table), printed with them.
    pub source: String,
    pub row: Vec<PaperRow>,
    #[serde(default)]
    pub comparison: Vec<Comparison>,
}

impl PaperNumbers {
    pub fn load(path: &Path) -> Result<Self, ReportError> {
        let text = std::fs::read_to_string(path).map_err(|e| ReportError::io(path, e))?;
        let invalid = |message: String| ReportError::Invalid {
            what: format!("published numbers {}", path.display()),
            message,
        };
        let numbers: Self = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        if let Some(c) = numbers.comparison.iter().find(|c| c.a == c.b) {
            return Err(invalid(format!(
                "comparison `{}` compares row `{}` with itself; `a` and `b` must name two rows",
                c.label, c.a
            )));
        }
        Ok(numbers)
    }

    fn for_run(&self, run: &str) -> Option<&PaperRow> {
        self.row.iter().find(|r| r.run.as_deref() == Some(run))
    }
}

/// The published table as it is, each row with the name of our run that stands for it ("–" when
/// we have none), so nobody mistakes their numbers for ours.
pub fn paper_table(paper: &PaperNumbers, runs: &[RunReport]) -> String {
    let mut out = "| model (paper's row) | test error (%), theirs | our run |\n| :-- | --: | :-- |\n".to_string();
    for r in &paper.row {
        let ours = r
            .run
            .as_deref()
            .filter(|name| runs.iter().any(|run| run.name == *name))
            .unwrap_or(MISSING);
        out += &format!(
            "| {} | {:.2} | {} |\n",
            r.model.replace('|', "\\|"),
            r.test_error_pct,
            ours.replace('|', "\\|")
        );
    }
    out += &format!("\nSource of these numbers: {}.\n", paper.source);
    out
}

/// The (transform, split) LEE columns over the final evals of `runs`, splits in reading order.
fn lee_columns(runs: &[RunReport]) -> BTreeSet<(String, u8, String)> {
    let mut cols = BTreeSet::new();
    for r in runs {
        for (split, m) in &r.last().splits {
            for t in m.lee.keys() {
                cols.insert((t.clone(), split_rank(split), split.clone()));
            }
        }
    }
    cols
}

/// Header cells: `first`, the paper's column when there is a paper, then one per LEE column.
fn header_cells(first: &[&str], paper: bool, lee_cols: &BTreeSet<(String, u8, String)>) -> Vec<String> {
    let mut header: Vec<String> = first.iter().map(|c| c.to_string()).collect();
    if paper {
        header.push("paper's test error (%), theirs".into());
    }
    header.extend(lee_cols.iter().map(|(t, _, s)| format!("LEE {t} ({s})")));
    header
}

/// The header line and the alignment line (first column left, the rest right).
fn table_head(header: &[String]) -> String {
    let align: Vec<&str> = (0..header.len()).map(|i| if i == 0 { ":--" } else { "--:" }).collect();
    format!("| {} |\n| {} |\n", header.join(" | "), align.join(" | "))
}

/// A markdown table of the final eval of each run: name, parameters, seed, test error and the
/// images it was measured on, the paper's error for the same row (when `paper` is given, labelled
/// as theirs), LEE per split and transform (mean ± s.e.), the LEE gaps against train, final step
/// and wall time. Columns are the union over runs; a run without a value shows "–".
pub fn markdown_table(runs: &[RunReport], paper: Option<&PaperNumbers>) -> String {
    let lee_cols = lee_columns(runs);
    let mut gap_cols = BTreeSet::new();
    for r in runs {
        gap_cols.extend(r.last().gaps().into_keys().filter(|g| g.contains("_lee_")));
    }
    // Gap columns: test before the OOD sets, each by transform.
    let mut gap_cols: Vec<String> = gap_cols.into_iter().collect();
    gap_cols.sort_by_key(|g| (split_rank(g.split("_minus_train").next().unwrap_or("")), g.clone()));
    let mut header = header_cells(
        &["run", "params", "seed", "test error (%)", "test images"],
        paper.is_some(),
        &lee_cols,
    );
    header.extend(gap_cols.iter().map(|g| g.replace("_minus_train_lee_", " − train, ")));
    header.extend(["step".into(), "wall time".into()]);
    let mut out = table_head(&header);
    for r in runs {
        let last = r.last();
        let gaps = last.gaps();
        let mut row = vec![
            r.name.replace('|', "\\|"),
            r.summary.params.map(params).unwrap_or(MISSING.into()),
            r.summary.seed.map(|s| s.to_string()).unwrap_or(MISSING.into()),
            r.test_error_pct().map(|e| format!("{e:.2}")).unwrap_or(MISSING.into()),
            match r.test_images() {
                0 => MISSING.into(),
                n => n.to_string(),
            },
        ];
        if let Some(p) = paper {
            row.push(
                p.for_run(&r.name)
                    .map(|p| format!("{:.2} ({})", p.test_error_pct, p.model.replace('|', "\\|")))
                    .unwrap_or(MISSING.into()),
            );
        }
        row.extend(lee_cols.iter().map(|(t, _, s)| {
            last.splits
                .get(s)
                .and_then(|m| m.lee.get(t))
                .map(|m| pm(m.mean, m.stderr))
                .unwrap_or(MISSING.into())
        }));
        row.extend(
            gap_cols
                .iter()
                .map(|g| gaps.get(g).map(|v| format!("{v:+.2e}")).unwrap_or(MISSING.into())),
        );
        row.push(last.step.to_string());
        row.push(r.summary.wall_time_s.map(wall).unwrap_or(MISSING.into()));
        out += &format!("| {} |\n", row.join(" | "));
    }
    out
}

/// The row a run belongs to: its name without the `_s<seed>` suffix that names the runs of one
/// config with other seeds (`gcnn_c8_s2`, seed 2, is a run of `gcnn_c8`).
pub fn row_of(run: &RunReport) -> String {
    match run.summary.seed {
        Some(seed) => run
            .name
            .strip_suffix(&format!("_s{seed}"))
            .unwrap_or(&run.name)
            .to_string(),
        None => run.name.clone(),
    }
}

/// Mean and sample standard deviation (the mean alone for a single value).
fn mean_std(v: &[f64]) -> String {
    let m = mean(v);
    match sample_std(v) {
        Some(std) => format!("{m:.2e} ± {std:.1e}"),
        None => format!("{m:.3e}"),
    }
}

/// Runs grouped by [`row_of`], rows in first-seen order, runs in the given order.
pub fn rows_of(runs: &[RunReport]) -> Vec<(String, Vec<&RunReport>)> {
    let mut rows: Vec<(String, Vec<&RunReport>)> = Vec::new();
    for r in runs {
        let row = row_of(r);
        match rows.iter_mut().find(|(name, _)| *name == row) {
            Some((_, members)) => members.push(r),
            None => rows.push((row, vec![r])),
        }
    }
    rows
}

/// Per row (runs grouped by [`row_of`], in first-seen order), the final metrics over its seeds:
/// test error as mean ± sample std with the range, each LEE (split, transform) as mean ± std of
/// the runs' means, and the paper's number for the row labelled as theirs. `None` when no row has
/// two runs (then the per-run table says it all).
pub fn seed_table(runs: &[RunReport], paper: Option<&PaperNumbers>) -> Option<String> {
    let rows = rows_of(runs);
    if rows.iter().all(|(_, m)| m.len() < 2) {
        return None;
    }
    let lee_cols = lee_columns(runs);
    let header = header_cells(
        &["row", "seeds", "test error (%), mean ± std", "min – max"],
        paper.is_some(),
        &lee_cols,
    );
    let mut out = table_head(&header);
    for (row, members) in &rows {
        let seeds: Vec<String> = members
            .iter()
            .map(|r| r.summary.seed.map_or(MISSING.into(), |s| s.to_string()))
            .collect();
        let errors: Vec<f64> = members.iter().filter_map(|r| r.test_error_pct()).collect();
        let (err, range) = if errors.is_empty() {
            (MISSING.to_string(), MISSING.to_string())
        } else {
            let std = sample_std(&errors).map_or(String::new(), |s| format!(" ± {s:.2}"));
            let (lo, hi) = errors.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &e| {
                (lo.min(e), hi.max(e))
            });
            (format!("{:.2}{std}", mean(&errors)), format!("{lo:.2} – {hi:.2}"))
        };
        let mut cells = vec![row.replace('|', "\\|"), seeds.join(", "), err, range];
        if let Some(p) = paper {
            cells.push(
                p.for_run(row)
                    .map(|p| format!("{:.2} ({})", p.test_error_pct, p.model.replace('|', "\\|")))
                    .unwrap_or(MISSING.into()),
            );
        }
        cells.extend(lee_cols.iter().map(|(t, _, s)| {
            let v: Vec<f64> = members
                .iter()
                .filter_map(|r| r.last().splits.get(s).and_then(|m| m.lee.get(t)).map(|m| m.mean))
                .collect();
            if v.is_empty() {
                MISSING.into()
            } else {
                mean_std(&v)
            }
        }));
        out += &format!("| {} |\n", cells.join(" | "));
    }
    Some(out)
}

/// The transform whose test LEE the comparisons difference: rotation, the paper's question.
pub const COMPARED_TRANSFORM: &str = "rotate";

/// The cells of one difference: a − b, its 95% `interval`, its df and whether 0 is out; all "–"
/// (with why) when an interval cannot be formed.
fn difference_cells(
    a: &[f64],
    b: &[f64],
    interval: fn(&[f64], &[f64]) -> Option<DiffInterval>,
    fmt: fn(f64) -> String,
) -> [String; 4] {
    if a.len() < 2 || b.len() < 2 {
        return [
            format!("{MISSING} ({} and {} values)", a.len(), b.len()),
            MISSING.into(),
            MISSING.into(),
            MISSING.into(),
        ];
    }
    match interval(a, b) {
        Some(w @ DiffInterval { diff, lo, hi, df }) => [
            fmt(diff),
            format!("[{}, {}]", fmt(lo), fmt(hi)),
            format!("{df:.1}"),
            if w.excludes_zero() { "yes" } else { "no" }.into(),
        ],
        None => [
            format!("{} (no spread over seeds)", fmt(mean(a) - mean(b))),
            MISSING.into(),
            MISSING.into(),
            MISSING.into(),
        ],
    }
}

/// The `comparisons` over seeds: for each whose two rows (runs grouped by [`row_of`]) both have
/// two runs or more, mean(a) − mean(b) of the final test error (percentage points) and of the
/// final test rotation LEE (runs without it left out), each with its 95% Welch t interval (or,
/// for a `paired` comparison, over the seeds both rows have, the paired t interval), degrees of
/// freedom and whether the interval excludes 0. Comparisons that lack the runs are listed under
/// the table. `None` when there are no comparisons.
pub fn comparison_table(runs: &[RunReport], comparisons: &[Comparison]) -> Option<String> {
    if comparisons.is_empty() {
        return None;
    }
    let rows = rows_of(runs);
    let members = |row: &str| -> &[&RunReport] {
        rows.iter()
            .find(|(name, _)| name == row)
            .map_or(&[], |(_, m)| m.as_slice())
    };
    let t = COMPARED_TRANSFORM;
    let header: Vec<String> = [
        "comparison",
        "a − b",
        "runs (a, b)",
        "test error, a − b (pp)",
        "95% interval",
        "df",
        "excludes 0",
    ]
    .into_iter()
    .map(String::from)
    .chain([
        format!("test LEE {t}, a − b"),
        "95% interval".into(),
        "df".into(),
        "excludes 0".into(),
    ])
    .collect();
    let mut body = String::new();
    let mut skipped = Vec::new();
    for c in comparisons {
        let (a, b) = (members(&c.a), members(&c.b));
        // Paired: the runs of the seeds both rows have, a's run then b's, in a's order.
        let (a, b): (Vec<&RunReport>, Vec<&RunReport>) = if c.paired {
            a.iter()
                .filter_map(|ra| {
                    let seed = ra.summary.seed?;
                    b.iter().find(|rb| rb.summary.seed == Some(seed)).map(|rb| (*ra, *rb))
                })
                .unzip()
        } else {
            (a.to_vec(), b.to_vec())
        };
        if a.len() < 2 || b.len() < 2 {
            let runs = |n: usize| {
                if n == 1 {
                    "1 run".to_string()
                } else {
                    format!("{n} runs")
                }
            };
            skipped.push(if c.paired {
                format!(
                    "{} (paired by seed: {} of `{}` and `{}`)",
                    c.label,
                    if a.len() == 1 {
                        "1 seed has runs".to_string()
                    } else {
                        format!("{} seeds have runs", a.len())
                    },
                    c.a,
                    c.b
                )
            } else {
                format!(
                    "{} (`{}`: {}, `{}`: {})",
                    c.label,
                    c.a,
                    runs(a.len()),
                    c.b,
                    runs(b.len())
                )
            });
            continue;
        }
        // The final values of each row, aligned pair by pair when paired (a pair missing either
        // value is left out).
        let values = |f: &dyn Fn(&RunReport) -> Option<f64>| -> (Vec<f64>, Vec<f64>) {
            if c.paired {
                a.iter().zip(&b).filter_map(|(ra, rb)| Some((f(ra)?, f(rb)?))).unzip()
            } else {
                (
                    a.iter().filter_map(|r| f(r)).collect(),
                    b.iter().filter_map(|r| f(r)).collect(),
                )
            }
        };
        let interval = if c.paired { paired_interval } else { welch_interval };
        let (paired, runs) = if c.paired {
            (", paired by seed", format!("{} pairs", a.len()))
        } else {
            ("", format!("{}, {}", a.len(), b.len()))
        };
        let mut cells = vec![
            c.label.replace('|', "\\|"),
            format!("{} − {}{paired}", c.a, c.b).replace('|', "\\|"),
            runs,
        ];
        let (ea, eb) = values(&|r| r.test_error_pct());
        cells.extend(difference_cells(&ea, &eb, interval, |v| format!("{v:+.2}")));
        let (la, lb) = values(&|r| r.test_lee(t));
        cells.extend(difference_cells(&la, &lb, interval, |v| format!("{v:+.2e}")));
        body += &format!("| {} |\n", cells.join(" | "));
    }
    let mut out = String::new();
    if !body.is_empty() {
        out = table_head(&header) + &body;
    }
    if !skipped.is_empty() {
        out += &format!(
            "{}Not compared (a difference over seeds needs two runs or more of each row): {}.\n",
            if out.is_empty() { "" } else { "\n" },
            skipped.join("; ")
        );
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_formats() {
        assert_eq!(params(5_720_000), "5.72M");
        assert_eq!(params(21_500), "21.5k");
        assert_eq!(params(999), "999");
        assert_eq!(wall(42.0), "42.0 s");
        assert_eq!(wall(150.0), "2.5 min");
        assert_eq!(wall(7200.0), "2.00 h");
        assert_eq!(pm(1.234e-4, 5.6e-6), "1.23e-4 ± 5.6e-6");
        assert_eq!(mean_std(&[1.0, 2.0, 3.0]), "2.00e0 ± 1.0e0");
        assert_eq!(mean_std(&[0.5]), "5.000e-1");
    }
}
