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
        train_loss: Some((10.0f64).ln() / (1.0 + s)),
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
    assert_eq!(
        g["test_minus_train_lee_rotate"],
        lee("test", "rotate") - lee("train", "rotate")
    );
    assert_eq!(
        g["ood_fashion_minus_train_lee_translate_x"],
        lee("ood_fashion", "translate_x") - lee("train", "translate_x")
    );
    assert_eq!(
        g["test_minus_train_accuracy"],
        r.splits["test"].accuracy.unwrap() - 0.99
    );
    // 2 transforms × (test, ood) + accuracy; nothing for train against itself.
    assert_eq!(g.len(), 5);
    assert!(!record(3, false).gaps().contains_key("test_minus_train_accuracy"));
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
        assert_eq!(
            cell("test_loss").parse::<f64>().unwrap(),
            r.splits["test"].loss.unwrap()
        );
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

/// A run whose accuracy rises and whose LEE falls, as the plots should show.
fn training_run() -> Vec<EvalRecord> {
    (0..8)
        .map(|i| {
            let mut r = record(i * 250, false);
            let decay = 0.5f64.powi(i as i32);
            for (k, split) in r.splits.values_mut().enumerate() {
                for m in split.lee.values_mut() {
                    m.mean = (k + 1) as f64 * 1e-3 * decay;
                    m.stderr = m.mean * 0.1;
                }
                if let Some(a) = split.accuracy.as_mut() {
                    *a = 0.5 + 0.45 * (1.0 - decay);
                }
                if let Some(l) = split.loss.as_mut() {
                    *l = 2.0 * decay + 0.05;
                }
            }
            r
        })
        .collect()
}

/// Decode a PNG; return (width, height, number of distinct colours).
fn decode_png(path: &Path) -> (u32, u32, usize) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(bytes.len() > 10_000, "{} is only {} bytes", path.display(), bytes.len());
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let px = info.color_type.samples();
    let colours: std::collections::HashSet<&[u8]> = buf[..info.buffer_size()].chunks(px).collect();
    (info.width, info.height, colours.len())
}

fn svg_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn training_plots_are_written_and_labelled() {
    let dir = tempfile::tempdir().unwrap();
    let stems = liederiv::report::plot_training(dir.path(), "synthetic", &training_run()).unwrap();
    assert_eq!(stems.len(), 2);
    for stem in &stems {
        let (w, h, colours) = decode_png(&stem.with_extension("png"));
        assert!(w >= 1000 && h >= 500, "{w}x{h}");
        // White background, black text and axes, three split colours and their bands, antialiasing.
        assert!(colours > 20, "{} has only {colours} colours", stem.display());
    }
    let acc = svg_text(&dir.path().join("accuracy.svg"));
    for label in [
        "training step",
        "accuracy (%)",
        "loss (nats, log scale)",
        "synthetic",
        "test",
        "train (running)",
    ] {
        assert!(acc.contains(label), "accuracy.svg lacks {label:?}");
    }
    let lee = svg_text(&dir.path().join("lee.svg"));
    for label in [
        "transform: rotate",
        "transform: translate_x",
        "LEE (mean",
        "ood_fashion",
        "training step",
    ] {
        assert!(lee.contains(label), "lee.svg lacks {label:?}");
    }
    // Only the two figures (and no temporary files) are left behind.
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["accuracy.png", "accuracy.svg", "lee.png", "lee.svg"]);

    let err = liederiv::report::plot_training(dir.path(), "empty", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("no metrics records"), "{err}");
}

#[test]
fn layerwise_plot_is_written_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let steps: Vec<String> = [
        "patch_embed",
        "pos_embed",
        "blocks.0.attn",
        "blocks.0.mlp.act",
        "norm",
        "head",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let transforms = vec![
        ("rotate".to_string(), vec![5.0, 0.1, 1.0, 2.0, 0.2, 0.0]),
        ("translate_x".to_string(), vec![1.0, 0.0, 0.5, 3.0, 0.1, 0.0]),
    ];
    let stem = dir.path().join("layerwise");
    liederiv::report::plot_layerwise(&stem, &transforms, &steps).unwrap();
    let (w, h, colours) = decode_png(&dir.path().join("layerwise.png"));
    assert!(w >= 1000 && h >= 700 && colours > 20, "{w}x{h} {colours}");
    let svg = svg_text(&dir.path().join("layerwise.svg"));
    for label in [
        "cumulative share",
        "patch_embed",
        "blocks.0.mlp.act",
        "rotate (Σ = 8.30e0)",
    ] {
        assert!(svg.contains(label), "layerwise.svg lacks {label:?}");
    }
    let short = vec![("rotate".to_string(), vec![1.0; 5])];
    let err = liederiv::report::plot_layerwise(&stem, &short, &steps)
        .unwrap_err()
        .to_string();
    assert!(err.contains("5 contributions for 6 steps"), "{err}");
}

#[test]
fn error_vs_lee_scatter_is_written() {
    use liederiv::report::ScatterPoint;
    let dir = tempfile::tempdir().unwrap();
    let points = [
        ("mae_vit", 1.5, 2e-4),
        ("vit_scratch", 4.0, 9e-4),
        ("gcnn_c8", 2.2, 1e-6),
    ]
    .map(|(label, err, lee)| ScatterPoint {
        label: label.into(),
        test_error_pct: err,
        lee,
        lee_stderr: lee * 0.1,
    });
    let stem = dir.path().join("error_vs_lee");
    liederiv::report::plot_error_vs_lee(&stem, "rotate", &points).unwrap();
    let (_, _, colours) = decode_png(&dir.path().join("error_vs_lee.png"));
    assert!(colours > 10);
    let svg = svg_text(&dir.path().join("error_vs_lee.svg"));
    for label in ["test error (%)", "test LEE, rotate", "mae_vit", "gcnn_c8"] {
        assert!(svg.contains(label), "error_vs_lee.svg lacks {label:?}");
    }
}

/// Write a run directory as the trainer leaves it.
fn synthetic_run(
    root: &Path,
    dir: &str,
    name: &str,
    test_acc: f64,
    lee_scale: f64,
    summary: bool,
) -> std::path::PathBuf {
    let run = root.join(dir);
    let mut log = MetricsLog::create(&run).unwrap();
    for mut r in training_run() {
        for m in r.splits.values_mut() {
            for v in m.lee.values_mut() {
                v.mean *= lee_scale;
                v.stderr *= lee_scale;
            }
        }
        r.splits.get_mut("test").unwrap().accuracy = Some(test_acc);
        log.append(&r).unwrap();
    }
    std::fs::write(run.join("config.toml"), format!("name = \"{name}\"\nseed = 3\n")).unwrap();
    if summary {
        std::fs::write(
            run.join("summary.json"),
            r#"{"params": 215000, "wall_time_s": 125.0, "seed": 3, "images_per_sec": 900.0}"#,
        )
        .unwrap();
    }
    run
}

#[test]
fn report_command_builds_table_and_plots() {
    use liederiv::cli::{report_cmd, ReportArgs};
    let root = tempfile::tempdir().unwrap();
    let a = synthetic_run(root.path(), "a", "mae_vit", 0.985, 1.0, true);
    let b = synthetic_run(root.path(), "b", "gcnn_c8", 0.97, 1e-3, false);
    let md = root.path().join("results").join("RESULTS.md");
    let paper = root.path().join("paper.toml");
    std::fs::write(
        &paper,
        "source = \"Gruver et al. 2023, Table 1\"\n\
         [[row]]\nmodel = \"MAE ViT\"\ntest_error_pct = 1.14\nrun = \"mae_vit\"\n\
         [[row]]\nmodel = \"H-Net\"\ntest_error_pct = 1.69\n",
    )
    .unwrap();
    report_cmd::run(&ReportArgs {
        runs: vec![a.clone(), b.clone()],
        markdown: Some(md.clone()),
        paper: Some(paper.clone()),
    })
    .unwrap();

    let text = std::fs::read_to_string(&md).unwrap();
    let (table, published) = text
        .split_once("\n\n")
        .expect("our table, a blank line, the paper's table");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    let cells = |l: &str| {
        l.trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_string())
            .collect::<Vec<_>>()
    };
    let header = cells(lines[0]);
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("no {name}: {header:?}"))
    };
    let (ra, rb) = (cells(lines[2]), cells(lines[3]));
    assert_eq!(ra.len(), header.len());
    assert_eq!(ra[col("run")], "mae_vit");
    assert_eq!(ra[col("params")], "215.0k");
    assert_eq!(ra[col("test error (%)")], "1.50");
    assert_eq!(ra[col("seed")], "3");
    let test_n = read_jsonl(&a.join(METRICS_JSONL)).unwrap().pop().unwrap().splits["test"].n;
    assert_eq!(ra[col("test images")], test_n.to_string());
    // The paper's number sits in its own, labelled column, only on the run it stands for.
    assert_eq!(ra[col("paper's test error (%), theirs")], "1.14 (MAE ViT)");
    assert_eq!(rb[col("paper's test error (%), theirs")], "–");
    // The published table lists every paper row, with our run where there is one.
    let rows: Vec<Vec<String>> = published.lines().filter(|l| l.starts_with('|')).map(cells).collect();
    assert_eq!(rows[0], ["model (paper's row)", "test error (%), theirs", "our run"]);
    assert_eq!(rows[2], ["MAE ViT", "1.14", "mae_vit"]);
    assert_eq!(rows[3], ["H-Net", "1.69", "–"]);
    assert!(published.contains("Gruver et al. 2023, Table 1"), "{published}");
    assert_eq!(ra[col("wall time")], "2.1 min");
    assert_eq!(ra[col("step")], "1750");
    // The table shows the last record's values, formatted as documented.
    let last = read_jsonl(&a.join(METRICS_JSONL)).unwrap().pop().unwrap();
    let m = last.splits["test"].lee["rotate"];
    assert_eq!(
        ra[col("LEE rotate (test)")],
        format!("{:.2e} ± {:.1e}", m.mean, m.stderr)
    );
    let gap = last.gaps()["ood_fashion_minus_train_lee_rotate"];
    assert_eq!(ra[col("ood_fashion − train, rotate")], format!("{gap:+.2e}"));
    assert_eq!(rb[col("run")], "gcnn_c8");
    assert_eq!(rb[col("test error (%)")], "3.00");
    assert_eq!(rb[col("params")], "–");

    for run in [&a, &b] {
        for f in ["accuracy.png", "accuracy.svg", "lee.png", "lee.svg"] {
            assert!(run.join(f).is_file(), "{} missing", run.join(f).display());
        }
    }
    for t in ["rotate", "translate_x"] {
        let stem = md.with_file_name(format!("RESULTS_error_vs_lee_{t}"));
        decode_png(&stem.with_extension("png"));
        assert!(svg_text(&stem.with_extension("svg")).contains("gcnn_c8"));
    }

    // A missing run directory is named in the error.
    let err = report_cmd::run(&ReportArgs {
        runs: vec![a.clone(), root.path().join("no_such_run")],
        markdown: None,
        paper: None,
    })
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("no_such_run") && msg.contains("does not exist"), "{msg}");
    // A directory without metrics says so.
    let empty = root.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let msg = format!(
        "{:#}",
        report_cmd::run(&ReportArgs {
            runs: vec![empty],
            markdown: None,
            paper: None,
        })
        .unwrap_err()
    );
    assert!(msg.contains("has no metrics.jsonl"), "{msg}");
    // A malformed published-numbers file is named in the error.
    std::fs::write(&paper, "source = \"x\"\n[[row]]\nmodel = \"y\"\n").unwrap();
    let msg = format!(
        "{:#}",
        report_cmd::run(&ReportArgs {
            runs: vec![a],
            markdown: None,
            paper: Some(paper),
        })
        .unwrap_err()
    );
    assert!(msg.contains("paper.toml") && msg.contains("test_error_pct"), "{msg}");
}

#[test]
fn seed_table_groups_runs_of_one_row() {
    use liederiv::report::{load_run, row_of, seed_table};
    let root = tempfile::tempdir().unwrap();
    let mut runs = Vec::new();
    // gcnn_c8 over seeds 0, 1, 2 with test errors 3, 4 and 2 %; mae_vit once; "odd_s5" has seed
    // 3, so its suffix is part of its name, not a seed.
    for (name, seed, acc) in [
        ("gcnn_c8", 0, 0.97),
        ("mae_vit", 0, 0.9),
        ("gcnn_c8_s1", 1, 0.96),
        ("gcnn_c8_s2", 2, 0.98),
        ("odd_s5", 3, 0.5),
    ] {
        let dir = synthetic_run(root.path(), name, name, acc, 1.0 + seed as f64, false);
        std::fs::write(dir.join("summary.json"), format!(r#"{{"seed": {seed}}}"#)).unwrap();
        runs.push(load_run(&dir).unwrap());
    }
    let rows: Vec<String> = runs.iter().map(row_of).collect();
    assert_eq!(rows, ["gcnn_c8", "mae_vit", "gcnn_c8", "gcnn_c8", "odd_s5"]);
    let table = seed_table(&runs, None).expect("a row with three seeds");
    let lines: Vec<Vec<String>> = table
        .lines()
        .map(|l| l.trim_matches('|').split('|').map(|c| c.trim().to_string()).collect())
        .collect();
    assert_eq!(lines.len(), 2 + 3, "{table}");
    let col = |h: &str| lines[0].iter().position(|c| c == h).unwrap_or_else(|| panic!("no {h}"));
    let g = &lines[2];
    assert_eq!(g[0], "gcnn_c8");
    assert_eq!(g[col("seeds")], "0, 1, 2");
    assert_eq!(g[col("test error (%), mean ± std")], "3.00 ± 1.00");
    assert_eq!(g[col("min – max")], "2.00 – 4.00");
    // LEE: mean ± sample std of the runs' final means (scaled 1, 2, 3 times here).
    let base = read_jsonl(&root.path().join("gcnn_c8").join(METRICS_JSONL))
        .unwrap()
        .pop()
        .unwrap()
        .splits["test"]
        .lee["rotate"]
        .mean;
    assert_eq!(
        g[col("LEE rotate (test)")],
        format!("{:.2e} ± {:.1e}", 2.0 * base, base)
    );
    assert_eq!(lines[3][col("test error (%), mean ± std")], "10.00");
    assert_eq!(lines[4][0], "odd_s5");
    // One run per row: nothing to aggregate.
    assert!(seed_table(&runs[..2], None).is_none());
}

/// Pixel positions (x, y) of exactly `rgb` in a decoded PNG, and its width.
fn pixels_of(path: &Path, rgb: [u8; 3]) -> (u32, Vec<(u32, u32)>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let px = info.color_type.samples();
    let hits = buf[..info.buffer_size()]
        .chunks(px)
        .enumerate()
        .filter(|(_, c)| c[..3] == rgb)
        .map(|(i, _)| (i as u32 % info.width, i as u32 / info.width))
        .collect();
    (info.width, hits)
}

fn median(mut v: Vec<u32>) -> u32 {
    v.sort_unstable();
    v[v.len() / 2]
}

#[test]
fn training_plot_draws_each_series_where_its_values_are() {
    // The synthetic run's test accuracy rises (50% → 95%) and its test loss falls: in the
    // decoded accuracy.png the test colour (orange) must sit low on the left of the accuracy
    // panel and high on its right, and the other way round in the loss panel beside it.
    let dir = tempfile::tempdir().unwrap();
    liederiv::report::plot_training(dir.path(), "synthetic", &training_run()).unwrap();
    let (width, orange) = pixels_of(&dir.path().join("accuracy.png"), [255, 127, 14]);
    assert!(orange.len() > 500, "only {} orange pixels", orange.len());
    let half = width / 2;
    let ys = |lo: u32, hi: u32| -> Vec<u32> {
        orange
            .iter()
            .filter(|(x, _)| (lo..hi).contains(x))
            .map(|p| p.1)
            .collect()
    };
    // Thirds of each panel (screen y grows downwards).
    let third = half / 3;
    let (acc_left, acc_right) = (median(ys(0, third)), median(ys(2 * third, half)));
    let (loss_left, loss_right) = (median(ys(half, half + third)), median(ys(half + 2 * third, width)));
    assert!(
        acc_left > acc_right + 50,
        "accuracy should rise: left y {acc_left}, right y {acc_right}"
    );
    assert!(
        loss_left + 50 < loss_right,
        "loss should fall: left y {loss_left}, right y {loss_right}"
    );
}
