//! TensorBoard event files (`report::tensorboard`) against TensorBoard itself (issue 35):
//! - tests/fixtures/tensorboard/pytorch/: an event file written by PyTorch's `SummaryWriter`
//!   (torch 2.15, tensorboard 2.21) for known scalars, by
//!   scripts/fixtures/make_tensorboard_fixture.py: our reader decodes it to exactly those
//!   (tag, step, value, wall time) records;
//! - tests/fixtures/tensorboard/ours/: the event file our writer writes for the same scalars
//!   (the evaluation records of [`records`]), committed by the ignored test
//!   `write_our_event_file_fixture`; the same script reads it with TensorBoard's
//!   `EventAccumulator` and checks it against its own list (its output:
//!   scripts/fixtures/make_tensorboard_fixture.out). Here: our writer still writes these events.
//!
//! The known scalars are written out twice on purpose, here as evaluation records and in the
//! script as (tag, step, value) triples: negative gaps, values down to an f32 subnormal, an
//! absent training loss at step 0.

mod common;
use common::fixture;
use liederiv::report::tensorboard::{read_events, scalars_of, Event, EventFile};
use liederiv::report::{EvalRecord, MeanStderr, SplitMetrics};
use std::path::{Path, PathBuf};

fn split(n: usize, loss: f64, accuracy: f64, lee: &[(&str, f64)]) -> SplitMetrics {
    SplitMetrics {
        n,
        loss: Some(loss),
        accuracy: Some(accuracy),
        lee: lee
            .iter()
            .map(|(t, m)| {
                let v = MeanStderr {
                    mean: *m,
                    stderr: 0.1 * m,
                    n: 64,
                };
                (t.to_string(), v)
            })
            .collect(),
    }
}

/// Three evaluations (steps 0, 100, 250); the same numbers as `RECORDS` in
/// make_tensorboard_fixture.py.
fn records() -> Vec<EvalRecord> {
    let rec = |step, lr, train_loss, splits: Vec<(&str, SplitMetrics)>| EvalRecord {
        step,
        epoch: step as f64 / 50.0,
        lr,
        train_loss,
        images_per_sec: 1234.5,
        splits: splits.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
    };
    vec![
        rec(
            0,
            0.0,
            None,
            vec![
                ("train", split(64, 2.2875, 0.09375, &[("rotate", 0.0123)])),
                (
                    "test",
                    split(128, 2.3125, 0.1015625, &[("rotate", 0.0131), ("translate_x", 3.5e-9)]),
                ),
            ],
        ),
        rec(
            100,
            1e-3,
            Some(0.71),
            vec![
                ("train", split(64, 0.65, 0.8125, &[("rotate", 0.25)])),
                (
                    "test",
                    split(128, 0.7, 0.78125, &[("rotate", 0.2), ("translate_x", 1.25e-12)]),
                ),
            ],
        ),
        rec(
            250,
            2.5e-5,
            Some(0.12),
            vec![
                ("train", split(64, 0.1, 0.984375, &[("rotate", 0.0625)])),
                (
                    "test",
                    split(128, 0.3, 0.9453125, &[("rotate", 0.05), ("translate_x", 1e-40)]),
                ),
                ("ood_fashion", split(32, 4.5, 0.125, &[("rotate", 0.0375)])),
            ],
        ),
    ]
}

/// Wall time the script gives event `i` (the writer's own first event has the clock's).
fn script_wall_time(step: usize) -> f64 {
    1_700_000_000.25 + step as f64
}

/// (tag, step, value bits) of every scalar of every event, sorted.
fn triples(events: &[Event]) -> Vec<(String, i64, u32)> {
    let mut v: Vec<(String, i64, u32)> = events
        .iter()
        .flat_map(|e| e.scalars.iter().map(move |(t, x)| (t.clone(), e.step, x.to_bits())))
        .collect();
    v.sort();
    v
}

/// What `records()` should become: `scalars_of` rounded to f32 as TensorBoard stores them.
fn expected() -> Vec<(String, i64, u32)> {
    let mut v: Vec<(String, i64, u32)> = records()
        .iter()
        .flat_map(|r| {
            scalars_of(r)
                .into_iter()
                .map(|(t, x)| (t, r.step as i64, (x as f32).to_bits()))
        })
        .collect();
    v.sort();
    v
}

fn only_file(dir: &Path) -> PathBuf {
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains("tfevents"))
        .collect();
    assert_eq!(files.len(), 1, "{}: {files:?}", dir.display());
    files[0].clone()
}

#[test]
fn the_known_scalars_are_the_ones_the_script_writes() {
    // The tags our records give, with the script's spelling (a typo on either side fails here
    // before it fails as a decode mismatch).
    let tags: std::collections::BTreeSet<String> = expected().into_iter().map(|(t, _, _)| t).collect();
    let want = [
        "accuracy/ood_fashion",
        "accuracy/test",
        "accuracy/train",
        "gap/ood_fashion_minus_train_lee_rotate",
        "gap/test_minus_train_accuracy",
        "gap/test_minus_train_lee_rotate",
        "lee_rotate/ood_fashion",
        "lee_rotate/test",
        "lee_rotate/train",
        "lee_translate_x/test",
        "loss/ood_fashion",
        "loss/test",
        "loss/train",
        "train/loss",
        "train/lr",
    ];
    assert_eq!(tags.iter().map(String::as_str).collect::<Vec<_>>(), want);
    assert_eq!(expected().len(), 10 + 11 + 15);
    // Negative and tiny values are among them.
    let values: Vec<f32> = expected().iter().map(|(_, _, b)| f32::from_bits(*b)).collect();
    assert!(values.iter().any(|v| *v < 0.0));
    assert!(values.iter().any(|v| v.is_subnormal()));
}

#[test]
fn pytorch_summary_writer_events_decode_to_the_known_scalars() {
    let path = only_file(&fixture("tensorboard/pytorch"));
    let events = read_events(&path).unwrap();
    // SummaryWriter's first event names the file version and holds no scalar.
    assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
    assert!(events[0].scalars.is_empty());
    let scalar_events = &events[1..];
    assert!(scalar_events.iter().all(|e| e.file_version.is_none()));
    // add_scalar writes one event per scalar, stamped with the walltime it was given.
    assert_eq!(scalar_events.len(), expected().len());
    for e in scalar_events {
        assert_eq!(e.scalars.len(), 1, "{e:?}");
        assert_eq!(e.wall_time, script_wall_time(e.step as usize), "{e:?}");
    }
    let got = triples(scalar_events);
    for (g, w) in got.iter().zip(expected()) {
        assert_eq!(
            *g,
            w,
            "{} at step {}: TensorBoard's {:e}, ours {:e}",
            w.0,
            w.1,
            f32::from_bits(g.2),
            f32::from_bits(w.2)
        );
    }
    assert_eq!(got, expected());
    eprintln!("{}: {} scalars, all bit-identical to ours", path.display(), got.len());
}

/// Our writer's events for `records()` in `dir` (a fresh file, then one appended record).
fn write_ours(dir: &Path) -> PathBuf {
    let recs = records();
    let (first, last) = recs.split_at(recs.len() - 1);
    let mut file = EventFile::open(dir, None, first).unwrap();
    file.append(&last[0]).unwrap();
    drop(file);
    only_file(dir)
}

/// Events without their wall time (ours stamps the clock).
fn timeless(events: Vec<Event>) -> Vec<Event> {
    events.into_iter().map(|e| Event { wall_time: 0.0, ..e }).collect()
}

#[test]
fn our_writer_still_writes_the_file_tensorboard_read() {
    let dir = tempfile::tempdir().unwrap();
    let fresh = read_events(&write_ours(dir.path())).unwrap();
    assert_eq!(fresh[0].file_version.as_deref(), Some("brain.Event:2"));
    assert_eq!(triples(&fresh), expected());
    // One event per evaluation, its scalars in scalars_of's order.
    let steps: Vec<i64> = fresh[1..].iter().map(|e| e.step).collect();
    assert_eq!(steps, [0, 100, 250]);
    let committed = read_events(&only_file(&fixture("tensorboard/ours"))).unwrap();
    assert_eq!(
        timeless(fresh),
        timeless(committed),
        "our writer's events differ from tests/fixtures/tensorboard/ours (the file TensorBoard \
         was checked to read): rerun `cargo test --release --test tensorboard -- --ignored` and \
         scripts/fixtures/make_tensorboard_fixture.py"
    );
}

/// Regenerates tests/fixtures/tensorboard/ours/ (then rerun the script, which reads it).
#[test]
#[ignore]
fn write_our_event_file_fixture() {
    let dir = fixture("tensorboard/ours");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::create_dir_all(&dir).unwrap();
    let path = write_ours(&dir);
    // A fixed name: our writer names the file after the clock and the host.
    let fixed = dir.join("events.out.tfevents.1700000000.liederiv");
    std::fs::rename(&path, &fixed).unwrap();
    let per_event: Vec<(i64, usize)> = read_events(&fixed)
        .unwrap()
        .iter()
        .map(|e| (e.step, e.scalars.len()))
        .collect();
    eprintln!("wrote {} ((step, scalars) per event: {per_event:?})", fixed.display());
}
