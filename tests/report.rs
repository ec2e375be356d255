//! Reporting: metrics log round trips, CSV consistency, resume truncation, plots and the table.

use liederiv::report::{read_jsonl, EvalRecord, MeanStderr, MetricsLog, SplitMetrics, METRICS_CSV, METRICS_JSONL};
use std::collections::BTreeMap;
use std::path::Path;

fn ms(mean: f64, stderr: f64, n: usize) -> MeanStderr {
    MeanStderr { mean, stderr, n }
}

/// A record with awkward floats (non-terminating binary fractions, tiny and huge magnitudes) so
/// that a round trip through text must be exact, not approximately right.
fn record(step: usize, with_train_acc: bool) -> EvalRecord {
    let s = step as f64;
    let lee = |base: f64| {
        BTreeMap::from([
            ("rotate".to_string(), ms(base * 0.1 + s * 1e-7, 1.0 / 3.0 * 1e-3, 64)),
            ("translate_x".to_string(), ms(base * 0.01 + 1e-300, 2e-5, 64)),
        ])
    };
    let mut splits = BTreeMap::new();
    splits.insert(
        "train".to_string(),
        SplitMetrics {
            n: 64,
            loss: None,
            accuracy: with_train_acc.then_some(0.99),
            lee: lee(1.0),
        },
    );
    splits.insert(
        "test".to_string(),
        SplitMetrics {
            n: 50_000,
            loss: Some(0.1 + s / 7.0),
            accuracy: Some(0.9 + s * 1e-4),
            lee: lee(2.0),
        },
    );
    splits.insert(
        "ood_fashion".to_string(),
        SplitMetrics {
            n: 64,
            loss: None,
            accuracy: None,
            lee: lee(5.0),
        },
    );
    EvalRecord {
        step,
        epoch: s / 3.0,
        lr: 1e-3 * (1.0 + s).recip(),
        train_loss: 2.302585092994046 / (1.0 + s),
        images_per_sec: 1234.5678,
        splits,
    }
}

fn parse_csv(path: &Path) -> (Vec<String>, Vec<Vec<String>>) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<String> = lines.next().unwrap().split(',').map(String::from).collect();
    let rows = lines.map(|l| l.split(',').map(String::from).collect()).collect();
    (header, rows)
}

#[test]
fn jsonl_round_trip_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let records: Vec<EvalRecord> = (0..5).map(|i| record(i * 100, i == 4)).collect();
    let mut log = MetricsLog::create(dir.path()).unwrap();
    for r in &records {
        log.append(r).unwrap();
    }
    let back = read_jsonl(&dir.path().join(METRICS_JSONL)).unwrap();
    assert_eq!(back, records);
    // The derived gaps are in the file too, and equal to the method's values.
    let first = std::fs::read_to_string(dir.path().join(METRICS_JSONL)).unwrap();
    let v: serde_json::Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
    let gap = v["gaps"]["test_minus_train_lee_rotate"].as_f64().unwrap();
    assert_eq!(gap, records[0].gaps()["test_minus_train_lee_rotate"]);
}

#[test]
fn gaps_are_differences_against_train() {
    let r = record(3, true);
    let g = r.gaps();
    let lee = |s: &str, t: &str| r.splits[s].lee[t].mean;
    assert_eq!(g["test_minus_train_lee_rotate"], lee("test", "rotate") - lee("train", "rotate"));
    assert_eq!(
        g["ood_fashion_minus_train_lee_translate_x"],
        lee("ood_fashion", "translate_x") - lee("train", "translate_x")
    );
    assert_eq!(g["test_minus_train_accuracy"], r.splits["test"].accuracy.unwrap() - 0.99);
    // 2 transforms × (test, ood) + accuracy; nothing for train against itself.
    assert_eq!(g.len(), 5);
    assert!(record(3, false).gaps().get("test_minus_train_accuracy").is_none());
}

#[test]
fn csv_header_and_rows_agree_with_records() {
    let dir = tempfile::tempdir().unwrap();
    // The last record adds a column (train accuracy): the CSV is rewritten under a wider header.
    let records: Vec<EvalRecord> = (0..4).map(|i| record(i * 10, i == 3)).collect();
    let mut log = MetricsLog::create(dir.path()).unwrap();
    for r in &records {
        log.append(r).unwrap();
    }
    let (header, rows) = parse_csv(&dir.path().join(METRICS_CSV));
    assert_eq!(rows.len(), records.len());
    assert_eq!(&header[..5], ["step", "epoch", "lr", "train_loss", "images_per_sec"]);
    for want in [
        "test_loss",
        "test_accuracy",
        "train_accuracy",
        "test_lee_rotate",
        "test_lee_rotate_stderr",
        "ood_fashion_lee_translate_x",
        "train_lee_rotate_stderr",
        "test_minus_train_lee_rotate",
        "ood_fashion_minus_train_lee_translate_x",
        "test_minus_train_accuracy",
    ] {
        assert!(header.iter().any(|h| h == want), "missing column {want} in {header:?}");
    }
    for (row, r) in rows.iter().zip(&records) {
        assert_eq!(row.len(), header.len());
        let cell = |name: &str| &row[header.iter().position(|h| h == name).unwrap()];
        assert_eq!(cell("step").parse::<usize>().unwrap(), r.step);
        assert_eq!(cell("lr").parse::<f64>().unwrap(), r.lr);
        assert_eq!(cell("test_loss").parse::<f64>().unwrap(), r.splits["test"].loss.unwrap());
        assert_eq!(
            cell("ood_fashion_lee_rotate_stderr").parse::<f64>().unwrap(),
            r.splits["ood_fashion"].lee["rotate"].stderr
        );
        assert_eq!(
            cell("test_minus_train_lee_translate_x").parse::<f64>().unwrap(),
            r.gaps()["test_minus_train_lee_translate_x"]
        );
        // Missing values are empty cells, not zeros.
        assert_eq!(cell("train_accuracy").is_empty(), r.splits["train"].accuracy.is_none());
    }
    // A column no record has is not in the header.
    assert!(!header.iter().any(|h| h == "ood_fashion_accuracy"));
}

#[test]
fn resume_truncates_and_ends_identical() {
    let records: Vec<EvalRecord> = (0..6).map(|i| record(i * 50, i == 5)).collect();
    let whole = tempfile::tempdir().unwrap();
    let mut log = MetricsLog::create(whole.path()).unwrap();
    for r in &records {
        log.append(r).unwrap();
    }
    // Interrupted after the eval at step 150 had been logged and step 200's line torn in half;
    // the checkpoint being resumed is from step 100.
    let cut = tempfile::tempdir().unwrap();
    let mut log = MetricsLog::create(cut.path()).unwrap();
    for r in &records[..4] {
        log.append(r).unwrap();
    }
    drop(log);
    let jsonl = cut.path().join(METRICS_JSONL);
    let full = serde_json::to_string(&records[4]).unwrap();
    let mut f = std::fs::OpenOptions::new().append(true).open(&jsonl).unwrap();
    std::io::Write::write_all(&mut f, &full.as_bytes()[..full.len() / 2]).unwrap();
    drop(f);

    let mut log = MetricsLog::open_append(cut.path(), 100).unwrap();
    assert_eq!(log.records(), &records[..3]);
    assert_eq!(read_jsonl(&jsonl).unwrap(), &records[..3]);
    for r in &records[3..] {
        log.append(r).unwrap();
    }
    for name in [METRICS_JSONL, METRICS_CSV] {
        let a = std::fs::read(whole.path().join(name)).unwrap();
        let b = std::fs::read(cut.path().join(name)).unwrap();
        assert!(a == b, "{name} differs after resume");
    }
}

#[test]
fn bad_inputs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(METRICS_JSONL);
    std::fs::write(&path, "{\"step\": 1}\n").unwrap();
    let err = read_jsonl(&path).unwrap_err().to_string();
    assert!(err.contains("metrics.jsonl:1"), "{err}");

    let err = read_jsonl(&dir.path().join("nope.jsonl")).unwrap_err().to_string();
    assert!(err.contains("nope.jsonl"), "{err}");

    let mut log = MetricsLog::create(dir.path()).unwrap();
    let mut r = record(7, false);
    r.splits.get_mut("test").unwrap().lee.get_mut("rotate").unwrap().mean = f64::NAN;
    let err = log.append(&r).unwrap_err().to_string();
    assert!(err.contains("step 7") && err.contains("test_lee_rotate"), "{err}");
    // Nothing was written for the refused record.
    assert!(read_jsonl(&path).unwrap().is_empty());
}
