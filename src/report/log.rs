//! The metrics record of one periodic evaluation and its two on-disk forms: `metrics.jsonl` (one
//! JSON object per eval, the source of truth, as MAE's `log.txt`) and `metrics.csv` (the same
//! numbers flattened to one header, for spreadsheets and pandas).
//!
//! Both files are appended and flushed after every eval, so a killed run keeps what it measured.
//! The CSV header is a function of the *set* of columns seen so far (canonical order, below); when
//! a record brings a new column (say the final eval adds a split) the CSV is rewritten atomically
//! from the in-memory records, so an interrupted-and-resumed run ends with byte-identical files.

use super::{write_atomic, ReportError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// File names inside a run directory.
pub const METRICS_JSONL: &str = "metrics.jsonl";
pub const METRICS_CSV: &str = "metrics.csv";

/// A mean over images with its standard error (sample std / √n), as logged. The LEE engine
/// accumulates these (`lie::lee::MeanStderr`); this is its plain, serialisable snapshot.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct MeanStderr {
    pub mean: f64,
    pub stderr: f64,
    pub n: usize,
}

/// What one eval measured on one split (`train`, `val`, `test`, `ood_<name>`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct SplitMetrics {
    /// Images evaluated for loss / accuracy.
    pub n: usize,
    /// Mean cross-entropy (nats), when measured on this split.
    pub loss: Option<f64>,
    /// Top-1 accuracy in [0, 1], when measured on this split.
    pub accuracy: Option<f64>,
    /// LEE (paper Eq. 4) per transform name, over this split's fixed LEE subset.
    #[serde(default)]
    pub lee: BTreeMap<String, MeanStderr>,
}

/// One periodic evaluation of a run: a line of `metrics.jsonl`, a row of `metrics.csv`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct EvalRecord {
    /// Optimizer steps taken so far.
    pub step: usize,
    /// Epochs of the training set seen so far (fractional).
    pub epoch: f64,
    /// Learning rate at this step.
    pub lr: f64,
    /// Mean training loss since the previous eval; `None` at step 0 (before any training).
    pub train_loss: Option<f64>,
    /// Training throughput since the previous eval.
    pub images_per_sec: f64,
    pub splits: BTreeMap<String, SplitMetrics>,
}

impl EvalRecord {
    /// Equivariance gaps, named `<split>_minus_train_lee_<transform>`, for `test` and every
    /// `ood_*` split that shares a transform with `train` (difference of the LEE means), and
    /// `test_minus_train_accuracy` when both accuracies were measured.
    pub fn gaps(&self) -> BTreeMap<String, f64> {
        let mut gaps = BTreeMap::new();
        let Some(train) = self.splits.get("train") else {
            return gaps;
        };
        for (name, split) in &self.splits {
            if name != "test" && !name.starts_with("ood_") {
                continue;
            }
            for (t, v) in &split.lee {
                if let Some(base) = train.lee.get(t) {
                    gaps.insert(format!("{name}_minus_train_lee_{t}"), v.mean - base.mean);
                }
            }
            if name == "test" {
                if let (Some(a), Some(b)) = (split.accuracy, train.accuracy) {
                    gaps.insert("test_minus_train_accuracy".into(), a - b);
                }
            }
        }
        gaps
    }

    /// Every number of the record with its name (used to refuse non-finite values).
    fn named_values(&self) -> Vec<(String, f64)> {
        let mut v = vec![
            ("epoch".to_string(), self.epoch),
            ("lr".to_string(), self.lr),
            ("images_per_sec".to_string(), self.images_per_sec),
        ];
        v.extend(self.train_loss.map(|x| ("train_loss".to_string(), x)));
        for (col, value) in self.csv_cells() {
            if let Cell::Num(x) = value {
                v.push((col.to_string(), x));
            }
        }
        v
    }

    /// The record as (column, value) pairs, in canonical column order.
    fn csv_cells(&self) -> Vec<(Column, Cell)> {
        let mut cells = vec![
            (Column::Step, Cell::Int(self.step)),
            (Column::Epoch, Cell::Num(self.epoch)),
            (Column::Lr, Cell::Num(self.lr)),
            (Column::ImagesPerSec, Cell::Num(self.images_per_sec)),
        ];
        cells.extend(self.train_loss.map(|x| (Column::TrainLoss, Cell::Num(x))));
        for (name, s) in &self.splits {
            let col = |field| Column::Split(name.clone(), field);
            if let Some(x) = s.loss {
                cells.push((col(SplitField::Loss), Cell::Num(x)));
            }
            if let Some(x) = s.accuracy {
                cells.push((col(SplitField::Accuracy), Cell::Num(x)));
            }
            for (t, m) in &s.lee {
                cells.push((col(SplitField::Lee(t.clone(), false)), Cell::Num(m.mean)));
                cells.push((col(SplitField::Lee(t.clone(), true)), Cell::Num(m.stderr)));
            }
        }
        for (name, x) in self.gaps() {
            cells.push((Column::Gap(name), Cell::Num(x)));
        }
        cells
    }

    fn check_finite(&self) -> Result<(), ReportError> {
        match self.named_values().into_iter().find(|(_, x)| !x.is_finite()) {
            Some((field, value)) => Err(ReportError::NonFinite {
                step: self.step,
                field,
                value,
            }),
            None => Ok(()),
        }
    }
}

/// The training state of an evaluation in one line: step, epoch, lr, train loss, throughput.
pub fn eval_heading(r: &EvalRecord) -> String {
    let loss = r
        .train_loss
        .map_or("– (before training)".to_string(), |l| format!("{l:.4}"));
    format!(
        "step {} (epoch {:.2}, lr {:.3e}, train loss {loss}, {:.0} images/s)\n",
        r.step, r.epoch, r.lr, r.images_per_sec
    )
}

/// An evaluation as the console shows it: one row per split (images, loss, accuracy, LEE mean ±
/// stderr per transform), aligned, in Markdown table syntax.
pub fn eval_table(r: &EvalRecord) -> String {
    if r.splits.is_empty() {
        return String::new();
    }
    let transforms: BTreeSet<&String> = r.splits.values().flat_map(|m| m.lee.keys()).collect();
    let mut out = String::new();
    let mut rows = vec![vec!["split".to_string(), "n".into(), "loss".into(), "accuracy".into()]];
    rows[0].extend(transforms.iter().map(|t| format!("LEE {t}")));
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
        let mut row = vec![name.clone(), n, opt(m.loss, false), opt(m.accuracy, true)];
        row.extend(transforms.iter().map(|t| match m.lee.get(*t) {
            Some(v) => format!("{:.3e} ± {:.1e}", v.mean, v.stderr),
            None => "–".into(),
        }));
        rows.push(row);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
            .collect();
        format!("| {} |\n", padded.join(" | "))
    };
    for (i, row) in rows.into_iter().enumerate() {
        out += &line(row);
        if i == 0 {
            out += &line(widths.iter().map(|w| "-".repeat(*w)).collect());
        }
    }
    out
}

/// A CSV column. The derived order is the canonical header order: the fixed columns, then per
/// split (alphabetical) its loss, accuracy and, per transform, LEE mean then stderr; gaps last.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Column {
    Step,
    Epoch,
    Lr,
    TrainLoss,
    ImagesPerSec,
    Split(String, SplitField),
    Gap(String),
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum SplitField {
    Loss,
    Accuracy,
    /// (transform, is_stderr)
    Lee(String, bool),
}

impl std::fmt::Display for Column {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Column::Step => write!(f, "step"),
            Column::Epoch => write!(f, "epoch"),
            Column::Lr => write!(f, "lr"),
            Column::TrainLoss => write!(f, "train_loss"),
            Column::ImagesPerSec => write!(f, "images_per_sec"),
            Column::Split(s, SplitField::Loss) => write!(f, "{s}_loss"),
            Column::Split(s, SplitField::Accuracy) => write!(f, "{s}_accuracy"),
            Column::Split(s, SplitField::Lee(t, false)) => write!(f, "{s}_lee_{t}"),
            Column::Split(s, SplitField::Lee(t, true)) => write!(f, "{s}_lee_{t}_stderr"),
            Column::Gap(g) => write!(f, "{g}"),
        }
    }
}

enum Cell {
    Int(usize),
    Num(f64),
}

impl std::fmt::Display for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cell::Int(i) => write!(f, "{i}"),
            // Rust's shortest representation that parses back to the same f64.
            Cell::Num(x) => write!(f, "{x}"),
        }
    }
}

/// Quote a CSV field when it holds a comma, quote or newline (RFC 4180).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn csv_header(columns: &[Column]) -> String {
    let names: Vec<String> = columns.iter().map(|c| csv_field(&c.to_string())).collect();
    names.join(",") + "\n"
}

fn csv_row(columns: &[Column], record: &EvalRecord) -> String {
    let cells: BTreeMap<Column, Cell> = record.csv_cells().into_iter().collect();
    let row: Vec<String> = columns
        .iter()
        .map(|c| cells.get(c).map(|v| v.to_string()).unwrap_or_default())
        .collect();
    row.join(",") + "\n"
}

fn json_line(record: &EvalRecord) -> Result<String, ReportError> {
    // The gaps are derived, so they are written for readers of the file but not stored in the
    // struct (reading ignores them and recomputes).
    let mut value = serde_json::to_value(record).map_err(ReportError::Serialize)?;
    if let serde_json::Value::Object(map) = &mut value {
        let gaps = serde_json::to_value(record.gaps()).map_err(ReportError::Serialize)?;
        map.insert("gaps".into(), gaps);
    }
    Ok(serde_json::to_string(&value).map_err(ReportError::Serialize)? + "\n")
}

/// Read every record of a `metrics.jsonl`; a malformed line is an error naming the file and line.
pub fn read_jsonl(path: &Path) -> Result<Vec<EvalRecord>, ReportError> {
    let text = std::fs::read_to_string(path).map_err(|e| ReportError::io(path, e))?;
    parse_jsonl(&text, path, false)
}

/// Parse JSON lines. With `tolerate_torn_tail`, a last line without its newline that does not
/// parse (a write cut short by a kill) is dropped instead of being an error.
fn parse_jsonl(text: &str, path: &Path, tolerate_torn_tail: bool) -> Result<Vec<EvalRecord>, ReportError> {
    let mut records = Vec::new();
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<EvalRecord>(line) {
            Ok(r) => records.push(r),
            Err(_) if tolerate_torn_tail && !complete && i + 1 == lines.len() => {}
            Err(source) => {
                return Err(ReportError::Json {
                    path: path.to_path_buf(),
                    line: i + 1,
                    source,
                })
            }
        }
    }
    Ok(records)
}

/// The metrics files of one run, open for appending.
pub struct MetricsLog {
    jsonl_path: PathBuf,
    csv_path: PathBuf,
    jsonl: File,
    csv: File,
    columns: Vec<Column>,
    records: Vec<EvalRecord>,
    /// The TensorBoard event file, when asked for ([`MetricsLog::with_tensorboard`]).
    events: Option<super::tensorboard::EventFile>,
}

impl MetricsLog {
    /// Start fresh metrics files in `run_dir` (created if needed), replacing any old ones.
    pub fn create(run_dir: &Path) -> Result<Self, ReportError> {
        Self::start(run_dir, Vec::new())
    }

    /// Reopen a run's metrics for `--resume`: keep the records with `step <= keep_through_step`
    /// (those the checkpoint being resumed had already logged), drop the rest, and continue
    /// appending. Files are rewritten atomically, so a resumed run ends with exactly the files of
    /// an uninterrupted one. A missing `metrics.jsonl` starts empty.
    pub fn open_append(run_dir: &Path, keep_through_step: usize) -> Result<Self, ReportError> {
        let jsonl_path = run_dir.join(METRICS_JSONL);
        let records = match std::fs::read_to_string(&jsonl_path) {
            Ok(text) => parse_jsonl(&text, &jsonl_path, true)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(ReportError::io(&jsonl_path, e)),
        };
        let kept = records.into_iter().filter(|r| r.step <= keep_through_step).collect();
        Self::start(run_dir, kept)
    }

    /// Write both files from `records` atomically, then open them for appending.
    fn start(run_dir: &Path, records: Vec<EvalRecord>) -> Result<Self, ReportError> {
        std::fs::create_dir_all(run_dir).map_err(|e| ReportError::io(run_dir, e))?;
        let jsonl_path = run_dir.join(METRICS_JSONL);
        let csv_path = run_dir.join(METRICS_CSV);
        let columns = columns_of(&records);
        let mut jsonl_text = String::new();
        for r in &records {
            jsonl_text += &json_line(r)?;
        }
        write_atomic(&jsonl_path, jsonl_text.as_bytes())?;
        write_atomic(&csv_path, csv_text(&columns, &records).as_bytes())?;
        let open = |p: &Path| {
            OpenOptions::new()
                .append(true)
                .open(p)
                .map_err(|e| ReportError::io(p, e))
        };
        Ok(Self {
            jsonl: open(&jsonl_path)?,
            csv: open(&csv_path)?,
            jsonl_path,
            csv_path,
            columns,
            records,
            events: None,
        })
    }

    /// Also write every record to the TensorBoard event file beside the metrics: a fresh one, or
    /// for `--resume` (`keep_through_step`, as given to [`MetricsLog::open_append`]) the run's
    /// own, trimmed to the records kept (`super::tensorboard::EventFile::open`).
    pub fn with_tensorboard(mut self, keep_through_step: Option<usize>) -> Result<Self, ReportError> {
        let dir = self.jsonl_path.parent().unwrap_or(Path::new("."));
        self.events = Some(super::tensorboard::EventFile::open(
            dir,
            keep_through_step,
            &self.records,
        )?);
        Ok(self)
    }

    /// Append one eval to both files and flush them. Non-finite values are refused (the run
    /// should have stopped), naming the step and the field.
    pub fn append(&mut self, record: &EvalRecord) -> Result<(), ReportError> {
        record.check_finite()?;
        if let Some(events) = &mut self.events {
            events.append(record)?;
        }
        let line = json_line(record)?;
        self.jsonl
            .write_all(line.as_bytes())
            .and_then(|_| self.jsonl.flush())
            .map_err(|e| ReportError::io(&self.jsonl_path, e))?;
        self.records.push(record.clone());
        let needed: BTreeSet<Column> = record.csv_cells().into_iter().map(|(c, _)| c).collect();
        if needed.iter().all(|c| self.columns.contains(c)) && !self.columns.is_empty() {
            self.csv
                .write_all(csv_row(&self.columns, record).as_bytes())
                .and_then(|_| self.csv.flush())
                .map_err(|e| ReportError::io(&self.csv_path, e))?;
        } else {
            // A new column: rewrite the whole CSV under the widened header.
            self.columns = columns_of(&self.records);
            write_atomic(&self.csv_path, csv_text(&self.columns, &self.records).as_bytes())?;
            self.csv = OpenOptions::new()
                .append(true)
                .open(&self.csv_path)
                .map_err(|e| ReportError::io(&self.csv_path, e))?;
        }
        Ok(())
    }

    /// The records written so far (including those kept on resume).
    pub fn records(&self) -> &[EvalRecord] {
        &self.records
    }
}

/// The canonical header for a set of records: the union of their columns, sorted.
fn columns_of(records: &[EvalRecord]) -> Vec<Column> {
    let set: BTreeSet<Column> = records
        .iter()
        .flat_map(|r| r.csv_cells().into_iter().map(|(c, _)| c))
        .collect();
    set.into_iter().collect()
}

fn csv_text(columns: &[Column], records: &[EvalRecord]) -> String {
    if columns.is_empty() {
        return String::new();
    }
    let mut text = csv_header(columns);
    for r in records {
        text += &csv_row(columns, r);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_order_is_canonical() {
        let cols = [
            Column::Gap("a".into()),
            Column::Split("test".into(), SplitField::Lee("rotate".into(), true)),
            Column::Split("test".into(), SplitField::Lee("rotate".into(), false)),
            Column::Split("test".into(), SplitField::Accuracy),
            Column::Split("ood_f".into(), SplitField::Loss),
            Column::Step,
        ];
        let mut sorted = cols.to_vec();
        sorted.sort();
        let names: Vec<String> = sorted.iter().map(|c| c.to_string()).collect();
        assert_eq!(
            names,
            [
                "step",
                "ood_f_loss",
                "test_accuracy",
                "test_lee_rotate",
                "test_lee_rotate_stderr",
                "a"
            ]
        );
    }

    #[test]
    fn csv_field_quotes_only_when_needed() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"x\""), "\"say \"\"x\"\"\"");
    }
}
