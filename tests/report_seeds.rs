//! `liederiv report` over rows of several seeds: the `[[comparison]]` table of differences with
//! Welch or paired intervals, the per-row error-vs-LEE scatter and each row's LEE-over-training figure.

use liederiv::cli::{report_cmd, ReportArgs};
use liederiv::report::{EvalRecord, MeanStderr, MetricsLog, SplitMetrics};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A record at `step` with test accuracy `test_acc` and rotation LEE `lee` on train, test and
/// ood_fashion (scaled per split so the lines differ).
fn record(step: usize, test_acc: f64, lee: f64) -> EvalRecord {
    let split = |scale: f64, accuracy: Option<f64>| SplitMetrics {
        n: 100,
        loss: accuracy.map(|_| 0.5),
        accuracy,
        lee: BTreeMap::from([(
            "rotate".to_string(),
            MeanStderr {
                mean: lee * scale,
                stderr: lee * scale * 0.1,
                n: 16,
            },
        )]),
    };
    EvalRecord {
        step,
        epoch: step as f64 / 100.0,
        lr: 1e-3,
        train_loss: (step > 0).then_some(0.7),
        images_per_sec: 100.0,
        splits: BTreeMap::from([
            ("train".to_string(), split(0.5, None)),
            ("test".to_string(), split(1.0, Some(test_acc))),
            ("ood_fashion".to_string(), split(2.0, None)),
        ]),
    }
}

/// A run directory as the trainer leaves it: evals at steps 0, 100, 200 (and 50 when `extra`),
/// the last with the given final test accuracy and test rotation LEE.
fn run(root: &Path, name: &str, seed: u64, test_acc: f64, lee: f64, extra: bool) -> PathBuf {
    let dir = root.join(name);
    let mut log = MetricsLog::create(&dir).unwrap();
    let mut steps = vec![0, 100, 200];
    if extra {
        steps.insert(1, 50);
    }
    for &step in &steps {
        let scale = 1.0 + (200 - step) as f64 / 100.0;
        log.append(&record(step, test_acc, if step == 200 { lee } else { lee * scale }))
            .unwrap();
    }
    std::fs::write(dir.join("config.toml"), format!("name = \"{name}\"\n")).unwrap();
    std::fs::write(dir.join("summary.json"), format!(r#"{{"seed": {seed}}}"#)).unwrap();
    dir
}

fn cells(line: &str) -> Vec<String> {
    line.trim_matches('|')
        .split('|')
        .map(|c| c.trim().to_string())
        .collect()
}

/// Pixels of a PNG that have exactly the colour `rgb`.
fn count_colour(path: &Path, rgb: [u8; 3]) -> usize {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let px = info.color_type.samples();
    assert!(px >= 3, "{}: not an RGB image", path.display());
    buf[..info.buffer_size()].chunks(px).filter(|p| p[..3] == rgb).count()
}

#[test]
fn report_compares_rows_over_seeds_and_plots_them() {
    let root = tempfile::tempdir().unwrap();
    // Test errors 20, 17, 19 % against 22, 20, 21 %; test rotation LEE 0.10, 0.12, 0.11 against
    // 0.30, 0.26, 0.28. One vit_scratch seed evaluated once more (step 50).
    let runs = vec![
        run(root.path(), "mae_vit", 0, 0.80, 0.10, false),
        run(root.path(), "mae_vit_s1", 1, 0.83, 0.12, false),
        run(root.path(), "mae_vit_s2", 2, 0.81, 0.11, false),
        run(root.path(), "vit_scratch", 0, 0.78, 0.30, false),
        run(root.path(), "vit_scratch_s1", 1, 0.80, 0.26, true),
        run(root.path(), "vit_scratch_s2", 2, 0.79, 0.28, false),
    ];
    let paper = root.path().join("paper.toml");
    std::fs::write(
        &paper,
        "source = \"test\"\n\
         [[row]]\nmodel = \"MAE ViT\"\ntest_error_pct = 1.14\nrun = \"mae_vit\"\n\
         [[comparison]]\na = \"mae_vit\"\nb = \"vit_scratch\"\nlabel = \"MAE pretraining\"\n\
         [[comparison]]\na = \"mae_vit\"\nb = \"vit_scratch\"\nlabel = \"paired\"\npaired = true\n\
         [[comparison]]\na = \"gcnn_c8\"\nb = \"mae_vit\"\nlabel = \"G-CNN vs MAE\"\n\
         [[comparison]]\na = \"gcnn_c8\"\nb = \"mae_vit\"\nlabel = \"G-CNN paired\"\npaired = true\n",
    )
    .unwrap();
    let md = root.path().join("out").join("RESULTS.md");
    report_cmd::run(&ReportArgs {
        runs: runs.clone(),
        markdown: Some(md.clone()),
        paper: Some(paper.clone()),
    })
    .unwrap();

    let text = std::fs::read_to_string(&md).unwrap();
    let (_, differences) = text
        .split_once("Differences over seeds (95% t intervals)")
        .unwrap_or_else(|| panic!("no comparison section in\n{text}"));
    let table: Vec<Vec<String>> = differences.lines().filter(|l| l.starts_with('|')).map(cells).collect();
    assert_eq!(table.len(), 4, "header, alignment, two compared rows:\n{differences}");
    let header = &table[0];
    let row = &table[2];
    assert_eq!(row.len(), header.len());
    // Reference: scipy 1.17.1, stats.ttest_ind(a, b, equal_var=False) on the runs' final values
    // (errors as 100·(1 − accuracy)): error a − b = −2.3333, df 3.4483, 95% CI [−5.4542, 0.78755];
    // LEE a − b = −0.17, df 2.9412, 95% CI [−0.21155, −0.12845].
    let expected = [
        "MAE pretraining",
        "mae_vit − vit_scratch",
        "3, 3",
        "-2.33",
        "[-5.45, +0.79]",
        "3.4",
        "no",
        "-1.70e-1",
        "[-2.12e-1, -1.28e-1]",
        "2.9",
        "yes",
    ];
    assert_eq!(row, &expected, "{differences}");
    // The same runs paired by seed (errors −2, −3, −2; LEE −0.20, −0.14, −0.17). Reference: scipy
    // 1.17.1, stats.ttest_rel(a, b).confidence_interval(0.95): error [−3.7676, −0.89912], df 2;
    // LEE [−0.24452, −0.095476]. The pairs cancel the seeds' spread: error's interval now
    // excludes 0.
    let expected = [
        "paired",
        "mae_vit − vit_scratch, paired by seed",
        "3 pairs",
        "-2.33",
        "[-3.77, -0.90]",
        "2.0",
        "yes",
        "-1.70e-1",
        "[-2.45e-1, -9.55e-2]",
        "2.0",
        "yes",
    ];
    assert_eq!(&table[3], &expected, "{differences}");
    assert_eq!(header[3], "test error, a − b (pp)");
    assert_eq!(header[7], "test LEE rotate, a − b");
    // A comparison without two runs of each row is named, not dropped silently.
    assert!(
        differences.contains("Not compared")
            && differences.contains("G-CNN vs MAE (`gcnn_c8`: 0 runs, `mae_vit`: 3 runs)")
            && differences.contains("G-CNN paired (paired by seed: 0 seeds have runs of `gcnn_c8` and `mae_vit`)"),
        "{differences}"
    );

    // The scatter: one marker per row, named in a legend; no per-run labels.
    let scatter = md.with_file_name("RESULTS_error_vs_lee_rotate");
    let svg = std::fs::read_to_string(scatter.with_extension("svg")).unwrap();
    for label in ["mae_vit (3 seeds)", "vit_scratch (3 seeds)", "sample std"] {
        assert!(svg.contains(label), "scatter lacks {label:?}");
    }
    assert!(!svg.contains("mae_vit_s1"), "the row scatter labels runs");
    // tab10's first two colours (blue, orange) fill the two markers and their legend entries;
    // its third (green) would be a third marker.
    let png = scatter.with_extension("png");
    let blue = count_colour(&png, [31, 119, 180]);
    let orange = count_colour(&png, [255, 127, 14]);
    let green = count_colour(&png, [44, 160, 44]);
    assert!(blue > 100 && orange > 100, "blue {blue}, orange {orange} pixels");
    assert_eq!(green, 0);

    // One LEE-over-training figure per row, every LEE split drawn.
    for row in ["mae_vit", "vit_scratch"] {
        let stem = md.with_file_name(format!("RESULTS_lee_{row}"));
        assert!(stem.with_extension("png").is_file(), "{} missing", stem.display());
        let svg = std::fs::read_to_string(stem.with_extension("svg")).unwrap();
        for label in [
            format!("{row}: LEE over training, 3 seeds"),
            "band min–max".into(),
            "ood_fashion".into(),
            "train".into(),
            "test".into(),
        ] {
            assert!(svg.contains(&label), "{} lacks {label:?}", stem.display());
        }
    }

    // A comparison of a row with itself, or one with an unknown key, is refused when the file
    // is read.
    let refused = |comparison: &str| {
        std::fs::write(
            &paper,
            format!("source = \"test\"\nrow = []\n[[comparison]]\n{comparison}"),
        )
        .unwrap();
        let args = ReportArgs {
            runs: runs[..1].to_vec(),
            markdown: None,
            paper: Some(paper.clone()),
        };
        format!("{:#}", report_cmd::run(&args).unwrap_err())
    };
    let msg = refused("a = \"mae_vit\"\nb = \"mae_vit\"\nlabel = \"self\"\n");
    assert!(msg.contains("paper.toml") && msg.contains("with itself"), "{msg}");
    let msg = refused("a = \"x\"\nb = \"y\"\nlabel = \"l\"\ntest = \"t\"\n");
    assert!(msg.contains("unknown field"), "{msg}");
}
