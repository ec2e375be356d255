//! `liederiv eval --angles START:STOP:STEP` (issue 35): the grid's parsing and its errors, and
//! what a run writes: the table, angles.csv, angles.{png,svg} and the curve in `--json`.
//! Oracles: at 0° the curve is the plain evaluation (its accuracy; the mean softmax probability
//! of the true class recomputed here in f64 from `--predictions`' logits); a C4-averaged model's
//! curve repeats every 90° at every angle of the grid, 45° included; CSV and JSON hold the same
//! numbers.

mod common;
use liederiv::cli::parse_angles;
use std::collections::BTreeMap;
use std::path::Path;

#[test]
fn angle_grids_parse() {
    let ok = |s: &str| parse_angles(s).unwrap_or_else(|e| panic!("{s:?}: {e}")).0;
    assert_eq!(ok("0:360:90"), [0.0, 90.0, 180.0, 270.0]);
    let fine = ok("0:360:5");
    assert_eq!(fine.len(), 72);
    assert_eq!((fine[0], fine[1], fine[71]), (0.0, 5.0, 355.0));
    assert_eq!(ok("-90:90:45"), [-90.0, -45.0, 0.0, 45.0]);
    assert_eq!(ok(" 0 : 1 : 0.25 "), [0.0, 0.25, 0.5, 0.75]);
    // STOP is exclusive also when STEP does not divide the range in floating point.
    let tenths = ok("0:0.3:0.1");
    assert_eq!(tenths.len(), 3, "{tenths:?}");
    assert!(tenths.iter().all(|d| *d < 0.3));
    assert_eq!(ok("10:20:30"), [10.0]);
    assert_eq!(ok("0:10000:1").len(), 10_000);
}

#[test]
fn bad_angle_grids_are_refused_with_the_expected_form() {
    for bad in [
        "0:360:0",
        "0:360:-5",
        "90:0:10",
        "0:0:1",
        "0:360",
        "0:360:5:1",
        "a:360:5",
        "0:360:five",
        "",
        "0:10001:1",
        "nan:1:1",
        "0:inf:1",
    ] {
        match parse_angles(bad) {
            Ok(a) => panic!("{bad:?} parsed to {:?}", a.0),
            Err(e) => assert!(
                e.contains(&format!("{bad:?}")) && e.contains("START:STOP:STEP") && e.contains("0:360:5"),
                "{bad:?}: {e}"
            ),
        }
    }
    // The range errors say which rule was broken.
    let e = parse_angles("0:360:0").unwrap_err();
    assert!(
        e.contains("STEP > 0") && e.contains("STOP > START") && e.contains("10000"),
        "{e}"
    );

    // From the command line: a usage error before anything is loaded or written.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("runs");
    let sets = [format!("output.dir={:?}", out.display().to_string())];
    let (ok, _, err) = common::liederiv(&["eval", "--angles", "0:360:0"], &sets);
    assert!(!ok && err.contains("--angles") && err.contains("STEP > 0"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists(), "a refused grid created {}", out.display());
}

/// One row of angles.csv.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    split: String,
    degrees: f64,
    n: usize,
    error: f64,
    prob: f64,
}

/// The data rows of angles.csv (header and any other non-data line skipped).
fn read_rows(path: &Path) -> Vec<Row> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let num = |k: usize| f.get(k)?.parse::<f64>().ok();
            match (f.len(), num(1), f.get(2)?.parse::<usize>().ok(), num(3), num(4)) {
                (5, Some(degrees), Some(n), Some(error), Some(prob)) => Some(Row {
                    split: f[0].to_string(),
                    degrees,
                    n,
                    error,
                    prob,
                }),
                _ => None,
            }
        })
        .collect()
}

/// Mean over images of softmax(logits)[label], in f64, from `eval --predictions` rows of `split`.
fn true_class_prob(predictions: &str, split: &str) -> (usize, f64) {
    let mut lines = predictions.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(header[..4], ["split", "index", "label", "predicted"]);
    let probs: Vec<f64> = lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f[0] == split)
        .map(|f| {
            let label: usize = f[2].parse().unwrap();
            let logits: Vec<f64> = f[4..].iter().map(|v| v.parse().unwrap()).collect();
            let top = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = logits.iter().map(|l| (l - top).exp()).sum();
            (logits[label] - top).exp() / z
        })
        .collect();
    (probs.len(), probs.iter().sum::<f64>() / probs.len() as f64)
}

/// Pixels of exactly `rgb` in a decoded PNG, and its size.
fn png_pixels(path: &Path, rgb: [u8; 3]) -> ((u32, u32), usize) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let px = info.color_type.samples();
    let hits = buf[..info.buffer_size()].chunks(px).filter(|c| c[..3] == rgb).count();
    ((info.width, info.height), hits)
}

#[test]
fn eval_angles_writes_the_curve_to_the_table_csv_plots_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let mut sets = common::mnist_root(dir.path(), 40, 24);
    sets.extend(
        [
            "name=\"c4\"",
            "model.vit.patch_size=7",
            "model.vit.dim=16",
            "model.vit.depth=2",
            "model.vit.heads=2",
            "model.vit.pool=\"mean\"",
            "model.average_rotations=4",
            "lee.transforms=[\"rotate\"]",
        ]
        .map(String::from),
    );
    let json = dir.path().join("eval.json");
    let predictions = dir.path().join("predictions.csv");
    let (ok, stdout, err) = common::liederiv(
        &[
            "eval",
            "--splits",
            "test,train",
            "--angles",
            "0:360:45",
            "--json",
            &json.display().to_string(),
            "--predictions",
            &predictions.display().to_string(),
        ],
        &sets,
    );
    assert!(ok, "{err}");
    let run = dir.path().join("runs/c4");

    // The CSV: every (split, angle) of the grid once, with the split's size.
    let rows = read_rows(&run.join("angles.csv"));
    let grid: Vec<f64> = (0..8).map(|k| 45.0 * k as f64).collect();
    for (split, n) in [("test", 24), ("train", 40)] {
        let of: Vec<&Row> = rows.iter().filter(|r| r.split == split).collect();
        assert_eq!(of.iter().map(|r| r.degrees).collect::<Vec<_>>(), grid, "{split}");
        assert!(of.iter().all(|r| r.n == n), "{split}: {of:?}");
        assert!(
            of.iter()
                .all(|r| (0.0..=1.0).contains(&r.error) && r.prob > 0.0 && r.prob < 1.0),
            "{of:?}"
        );
    }
    assert_eq!(rows.len(), 16, "{rows:?}");

    // The JSON: the splits as before, and the same rows, value for value.
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let from_json: Vec<Row> = doc["angles"]
        .as_array()
        .expect("--json with --angles holds the curve")
        .iter()
        .map(|p| Row {
            split: p["split"].as_str().unwrap().to_string(),
            degrees: p["degrees"].as_f64().unwrap(),
            n: p["n"].as_u64().unwrap() as usize,
            error: p["error"].as_f64().unwrap(),
            prob: p["true_class_prob"].as_f64().unwrap(),
        })
        .collect();
    assert_eq!(from_json, rows);

    // 0° is the plain evaluation: its accuracy, and the true-class probability of its logits.
    let preds = std::fs::read_to_string(&predictions).unwrap();
    for split in ["test", "train"] {
        let at0 = rows.iter().find(|r| r.split == split && r.degrees == 0.0).unwrap();
        let accuracy = doc[split]["accuracy"].as_f64().unwrap();
        assert!(
            (at0.error - (1.0 - accuracy)).abs() < 1e-12,
            "{split}: {at0:?} vs accuracy {accuracy}"
        );
        let (n, p) = true_class_prob(&preds, split);
        assert_eq!(n, at0.n);
        eprintln!("{split}: p(true) at 0° {} vs {p} from the logits", at0.prob);
        assert!((at0.prob - p).abs() < 1e-6, "{split}: {} vs {p}", at0.prob);
    }

    // A C4-averaged model: θ and θ + 90° agree at every angle of the grid.
    let mut spread_45 = 0.0f64;
    for r in &rows {
        let base = rows
            .iter()
            .find(|b| b.split == r.split && b.degrees == r.degrees % 90.0)
            .unwrap();
        assert_eq!(r.error, base.error, "{} at {}°", r.split, r.degrees);
        assert!((r.prob - base.prob).abs() < 1e-6, "{r:?} vs {base:?}");
        if r.degrees == 45.0 {
            let at0 = rows.iter().find(|b| b.split == r.split && b.degrees == 0.0).unwrap();
            spread_45 = spread_45.max((r.prob - at0.prob).abs());
        }
    }
    // ... and is not flat: 45° is another input.
    eprintln!("C4-averaged ViT: max |p(true, 45°) − p(true, 0°)| = {spread_45:.2e}");
    assert!(spread_45 > 1e-5, "p(true) at 45° equals 0°'s ({spread_45:e})");

    // The table: one line per angle.
    for d in &grid {
        assert!(
            stdout.lines().any(|l| l.trim_start().starts_with(&format!("{d:.1}"))),
            "no {d}° line in\n{stdout}"
        );
    }

    // The plots: one curve per split (test first in the palette), in both panels.
    let ((w, h), blue) = png_pixels(&run.join("angles.png"), [31, 119, 180]);
    let (_, orange) = png_pixels(&run.join("angles.png"), [255, 127, 14]);
    assert_eq!((w, h), (1500, 620));
    assert!(
        blue > 300 && orange > 300,
        "series pixels: {blue} blue, {orange} orange"
    );
    let svg = std::fs::read_to_string(run.join("angles.svg")).unwrap();
    for text in ["test", "train", "error vs rotation", "confidence vs rotation"] {
        assert!(svg.contains(text), "angles.svg lacks {text:?}");
    }

    // Without --angles the JSON is the splits alone, the same numbers.
    let plain = dir.path().join("plain.json");
    let (ok, _, err) = common::liederiv(
        &["eval", "--splits", "test,train", "--json", &plain.display().to_string()],
        &sets,
    );
    assert!(ok, "{err}");
    let plain: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&plain).unwrap()).unwrap();
    assert_eq!(plain.keys().collect::<Vec<_>>(), ["test", "train"]);
    assert_eq!(plain["test"], doc["test"]);
}

/// A row's seeds are overlaid as their pointwise mean, at the angles all of them measured.
#[test]
fn seed_curves_average_pointwise_at_shared_angles() {
    use liederiv::report::angles::mean_series;
    let a = (
        "a".to_string(),
        vec![(0.0, 2.0, 0.9), (15.0, 4.0, 0.8), (30.0, 6.0, 0.7)],
    );
    let b = ("b".to_string(), vec![(0.0, 4.0, 0.7), (30.0, 8.0, 0.5)]);
    let (label, pts) = mean_series("row (mean of 2)", &[a.clone(), b]);
    assert_eq!(label, "row (mean of 2)");
    assert_eq!(pts, vec![(0.0, 3.0, 0.8), (30.0, 7.0, 0.6)]);
    assert_eq!(mean_series("one", std::slice::from_ref(&a)).1, a.1);
}
