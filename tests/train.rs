//! Trainer tests: AdamW against torch, the documented layer-wise lr decay, the schedule,
//! augmentation invariants, checkpoint round trips and mismatches.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use liederiv::config::{AugmentConfig, TrainConfig};
use liederiv::models::Rng;
use liederiv::train::checkpoint::{self, CheckpointError, Meta, RngState};
use liederiv::train::{group_for, AdamW, AdamWParams, Augmenter, Schedule};
use rand::{Rng as _, SeedableRng};

/*
scripts/adamw_fixture.py (torch 2.x, float64):
    w = [[0.5, -1.0, 2.0], [0.1, 0.2, -0.3]]  (lr 0.1, weight decay 0.05)
    b = [0.3, -0.2, 0.1]                       (lr 0.05, no weight decay)
    AdamW(betas=(0.9, 0.999), eps=1e-8); 3 steps; each step 2 micro-batches of
    loss = (sum(w² · c·(micro+1)) + sum(b · d·(step+1))) / 2, clip_grad_norm_(…, 1.0)
    norms 20.392400545301182, 19.76286031168788, 20.249268030962266
*/
#[test]
fn adamw_matches_torch_with_groups_accumulation_and_clipping() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let w = Var::from_tensor(&Tensor::new(&[[0.5f64, -1.0, 2.0], [0.1, 0.2, -0.3]], &dev)?)?;
    let b = Var::from_tensor(&Tensor::new(&[0.3f64, -0.2, 0.1], &dev)?)?;
    let hp = AdamWParams {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.05,
        layer_decay: 0.5,
        grad_clip: 1.0,
    };
    // As a depth-1 ViT: the weight is named like the head (layer id 2 → lr scale 1, decayed),
    // the bias like a block-0 norm (layer id 1 → lr scale 0.5, 1-D so no decay): torch's groups.
    let named = vec![
        ("head.weight".to_string(), w.clone()),
        ("blocks.0.norm1.bias".to_string(), b.clone()),
    ];
    let mut opt = AdamW::from_vars(named, hp, Some(1))?;
    let expect_norms = [20.392400545301182, 19.76286031168788, 20.249268030962266];
    for (step, want) in expect_norms.iter().enumerate() {
        for micro in 0..2 {
            let c = (Tensor::new(&[[1.0f64, 2.0, 3.0], [4.0, 5.0, 6.0]], &dev)? * (micro + 1) as f64)?;
            let d = (Tensor::new(&[1.0f64, -2.0, 3.0], &dev)? * (step + 1) as f64)?;
            // The optimiser averages the micro-batch gradients, so the loss is not divided here.
            let loss = ((w.as_tensor().sqr()? * c)?.sum_all()? + (b.as_tensor() * d)?.sum_all()?)?;
            opt.accumulate(&loss.backward()?)?;
        }
        let stats = opt.step(0.1)?;
        let norm = stats.grad_norm.unwrap_or(f64::NAN);
        assert!((norm - want).abs() < 1e-9, "step {step}: norm {norm} vs torch {want}");
    }
    let w_torch = [
        0.19875715769944247,
        -0.6880632570008535,
        1.6722044485379062,
        -0.07363743656590688,
        -0.06875436909843312,
        -0.010125401502087308,
    ];
    let b_torch = [0.15399644348721817, -0.053996433135475815, -0.04600357031510534];
    let got_w = w.as_tensor().flatten_all()?.to_vec1::<f64>()?;
    let got_b = b.as_tensor().to_vec1::<f64>()?;
    for (g, t) in got_w.iter().zip(w_torch).chain(got_b.iter().zip(b_torch)) {
        assert!((g - t).abs() < 1e-12, "{g} vs torch {t}");
    }
    assert_eq!(opt.step_count(), 3);
    Ok(())
}

/// MAE's param_groups_lrd with depth 2 and layer_decay 0.5: embeddings id 0 → 0.5³, blocks.i →
/// 0.5^(2−i), the rest → 1; no decay on 1-D tensors, pos_embed and cls_token.
#[test]
fn layer_decay_assigns_the_documented_lr_per_group() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let t = TrainConfig {
        layer_decay: 0.5,
        weight_decay: 0.05,
        ..TrainConfig::default()
    };
    let hp = AdamWParams::from_train(&t);
    let cases: [(&str, &[usize], f64, f64); 9] = [
        ("blocks.0.attn.qkv.weight", &[24, 8], 0.25, 0.05),
        ("blocks.0.norm1.weight", &[8], 0.25, 0.0),
        ("blocks.1.mlp.fc1.weight", &[32, 8], 0.5, 0.05),
        ("cls_token", &[1, 1, 8], 0.125, 0.0),
        ("head.weight", &[10, 8], 1.0, 0.05),
        ("norm.weight", &[8], 1.0, 0.0),
        ("patch_embed.proj.bias", &[8], 0.125, 0.0),
        ("patch_embed.proj.weight", &[8, 1, 7, 7], 0.125, 0.05),
        ("pos_embed", &[1, 17, 8], 0.125, 0.0),
    ];
    let vm = VarMap::new();
    for (n, s, _, _) in cases {
        vm.get(s, n, candle_nn::Init::Const(0.0), DType::F32, &dev)?;
    }
    let opt = AdamW::new(&vm, hp, Some(2))?;
    let groups = opt.groups();
    assert_eq!(groups.len(), cases.len());
    for ((name, _, lr_scale, wd), (gname, g)) in cases.iter().zip(&groups) {
        assert_eq!(name, gname);
        assert_eq!(g.lr_scale, *lr_scale, "{name} lr scale");
        assert_eq!(g.weight_decay, *wd, "{name} weight decay");
    }
    // Not a ViT: no layer decay at all.
    let g = group_for("blocks.0.conv.weight", 4, None, &hp);
    assert_eq!(g.lr_scale, 1.0);
    assert_eq!(g.weight_decay, 0.05);
    Ok(())
}

#[test]
fn schedule_warms_up_linearly_then_follows_the_cosine() {
    let s = Schedule {
        peak_lr: 1e-3,
        min_lr: 1e-5,
        warmup_steps: 10,
        total_steps: 110,
    };
    assert!((s.lr_at(0) - 1e-4).abs() < 1e-15);
    assert!((s.lr_at(4) - 5e-4).abs() < 1e-15);
    assert!((s.lr_at(10) - 1e-3).abs() < 1e-15);
    // Half way through the cosine: exactly the mid point of peak and floor.
    assert!((s.lr_at(60) - (1e-3 + 1e-5) / 2.0).abs() < 1e-15);
    assert!((s.lr_at(110) - 1e-5).abs() < 1e-15);
    assert!((s.lr_at(500) - 1e-5).abs() < 1e-15);
    for k in 10..110 {
        assert!(s.lr_at(k + 1) <= s.lr_at(k), "not monotone after warm-up at {k}");
    }
}

fn digits(b: usize, dev: &Device) -> candle_core::Result<Tensor> {
    let mut rng = Rng::seed_from_u64(7);
    let v: Vec<f32> = (0..b * 28 * 28).map(|_| rng.random::<f32>()).collect();
    Tensor::from_vec(v, (b, 1, 28, 28), dev)
}

fn max_abs(t: &Tensor) -> candle_core::Result<f32> {
    t.abs()?.max_all()?.to_scalar::<f32>()
}

#[test]
fn augmentation_off_is_identity_and_targets_are_smoothed() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let x = digits(4, &dev)?;
    let aug = Augmenter::new(
        &AugmentConfig::default(),
        10,
        0.1,
        liederiv::transforms::Blank::uniform(-0.42),
    );
    let out = aug.apply(&x, &[0, 3, 9, 3], &mut Rng::seed_from_u64(0))?;
    assert_eq!(max_abs(&(out.x - &x)?)?, 0.0);
    let t = out.targets.to_vec2::<f32>()?;
    assert!((t[1][3] - 0.91).abs() < 1e-6 && (t[1][0] - 0.01).abs() < 1e-6);
    Ok(())
}

#[test]
fn augmentation_is_seeded_mixes_soft_targets_and_keeps_blank_background() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let cfg = AugmentConfig {
        rotate_deg: 180.0,
        translate: 0.1,
        scale: 0.1,
        mixup_alpha: 0.8,
        cutmix_alpha: 1.0,
        erase_prob: 0.5,
        ..AugmentConfig::default()
    };
    let aug = Augmenter::new(&cfg, 10, 0.0, liederiv::transforms::Blank::uniform(-0.42));
    let x = digits(6, &dev)?;
    let labels = [0, 1, 2, 3, 4, 5];
    let a = aug.apply(&x, &labels, &mut Rng::seed_from_u64(3))?;
    let b = aug.apply(&x, &labels, &mut Rng::seed_from_u64(3))?;
    let c = aug.apply(&x, &labels, &mut Rng::seed_from_u64(4))?;
    assert_eq!(max_abs(&(&a.x - &b.x)?)?, 0.0, "same seed, same batch");
    assert!(max_abs(&(&a.x - &c.x)?)? > 0.1, "another seed, another batch");
    // Soft targets: rows sum to 1, mass only on the image's label and its partner's (reverse).
    let t = a.targets.to_vec2::<f32>()?;
    for (i, row) in t.iter().enumerate() {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        for (k, &p) in row.iter().enumerate() {
            if k != labels[i] as usize && k != labels[5 - i] as usize {
                assert_eq!(p, 0.0);
            }
        }
    }
    // A rotation of a blank image stays blank: the warp fills with the background value.
    let rot_cfg = AugmentConfig {
        rotate_deg: 180.0,
        ..AugmentConfig::default()
    };
    let rot = Augmenter::new(&rot_cfg, 10, 0.0, liederiv::transforms::Blank::uniform(-0.42));
    let blank = Tensor::full(-0.42f32, (3, 1, 28, 28), &dev)?;
    let r = rot.apply(&blank, &[1, 2, 3], &mut Rng::seed_from_u64(1))?;
    assert!(max_abs(&(r.x + 0.42)?)? < 1e-6);
    // Per-channel normalisation (photos): each channel's blank is its own, and a rotated blank
    // RGB image stays blank channel by channel (a uniform fill would leave corners of the wrong
    // colour: checked to move by the difference of the fills).
    let fills = [-2.1f32, -2.0, -1.8];
    let rgb = Augmenter::new(
        &rot_cfg,
        10,
        0.0,
        liederiv::transforms::Blank::per_channel(fills.iter().map(|&f| f as f64).collect()),
    );
    let blank = Tensor::from_vec(fills.to_vec(), (1, 3, 1, 1), &dev)?
        .broadcast_as((2, 3, 28, 28))?
        .contiguous()?;
    let r = rgb.apply(&blank, &[1, 2], &mut Rng::seed_from_u64(1))?;
    assert!(max_abs(&(&r.x - &blank)?)? < 1e-6);
    let wrong = Augmenter::new(&rot_cfg, 10, 0.0, liederiv::transforms::Blank::uniform(-2.1));
    let w = wrong.apply(&blank, &[1, 2], &mut Rng::seed_from_u64(1))?;
    assert!(max_abs(&(&w.x - &blank)?)? > 0.2);
    Ok(())
}

#[test]
fn checkpoint_round_trips_weights_optimiser_and_rng() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("last.safetensors");
    let init = candle_nn::Init::Randn { mean: 0., stdev: 1. };
    let vm = VarMap::new();
    let w = vm.get((3, 4), "head.weight", init, DType::F32, &dev)?;
    vm.get(4, "head.bias", candle_nn::Init::Const(0.5), DType::F32, &dev)?;
    let hp = AdamWParams::from_train(&TrainConfig::default());
    let mut opt = AdamW::new(&vm, hp, None)?;
    opt.accumulate(&w.sqr()?.sum_all()?.backward()?)?;
    opt.step(0.01)?;
    let mut rng = Rng::seed_from_u64(42);
    let _: u64 = rng.random();
    let meta = Meta {
        stage: "train".into(),
        step: 1,
        total_steps: 10,
        epoch: 0,
        cursor: 64,
        rng: RngState::of(&rng),
        loss_sum: 1.25,
        loss_count: 3,
        metrics: serde_json::json!({"acc": 0.5}),
        config: "name = \"x\"\n".into(),
        wall_time_s: Some(12.5),
    };
    checkpoint::save(&path, &vm, opt.state_tensors()?, &meta)?;

    let vm2 = VarMap::new();
    vm2.get((3, 4), "head.weight", candle_nn::Init::Const(0.0), DType::F32, &dev)?;
    vm2.get(4, "head.bias", candle_nn::Init::Const(0.0), DType::F32, &dev)?;
    let optim = checkpoint::load_weights(&path, &vm2, &dev)?;
    let mut opt2 = AdamW::new(&vm2, hp, None)?;
    let back = checkpoint::load_meta(&path)?;
    opt2.load_state(&optim, back.step)?;
    assert_eq!(back, meta);
    assert_eq!(opt2.step_count(), 1);
    let w2 = vm2.data().lock().map_err(|e| anyhow::anyhow!("{e}"))?["head.weight"]
        .as_tensor()
        .clone();
    assert_eq!(max_abs(&(w2 - &w)?)?, 0.0);
    for (k, t) in opt.state_tensors()? {
        // Includes the f64 step counter `optim.step`.
        let d = (&optim[&k] - t)?.to_dtype(DType::F32)?;
        assert_eq!(max_abs(&d)?, 0.0, "{k}");
    }
    // The restored RNG continues the same stream.
    let mut r2 = back.rng.restore().map_err(anyhow::Error::msg)?;
    assert_eq!(rng.random::<u64>(), r2.random::<u64>());
    // A sidecar from before the wall time was recorded reads as unknown, not as 0 s.
    edit_sidecar(&checkpoint::sidecar(&path), |json| {
        json.as_object_mut().map(|o| o.remove("wall_time_s"));
    })?;
    assert_eq!(checkpoint::load_meta(&path)?.wall_time_s, None);

    // A differently shaped model lists every mismatch.
    let vm3 = VarMap::new();
    vm3.get((5, 4), "head.weight", candle_nn::Init::Const(0.0), DType::F32, &dev)?;
    vm3.get(4, "fc_norm.bias", candle_nn::Init::Const(0.0), DType::F32, &dev)?;
    match checkpoint::load_weights(&path, &vm3, &dev) {
        Err(CheckpointError::Mismatch { problems, .. }) => {
            assert_eq!(problems.len(), 3, "{problems:?}");
            assert!(problems
                .iter()
                .any(|p| p.starts_with("head.weight: checkpoint shape [3, 4]")));
            assert!(problems.iter().any(|p| p.starts_with("fc_norm.bias: missing")));
            assert!(problems
                .iter()
                .any(|p| p.starts_with("head.bias: in the checkpoint but not")));
        }
        other => panic!("expected a mismatch, got {:?}", other.map(|_| ())),
    }
    // A missing file is a clear error naming it.
    let err = checkpoint::load_meta(&dir.path().join("nope.safetensors"))
        .err()
        .map(|e| e.to_string());
    assert!(err.is_some_and(|e| e.contains("nope.safetensors") && e.contains("does not exist")));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// End-to-end runs on real MNIST-rot, found as the CLI finds it ($LIEDERIV_DATA_DIR, else the Hub
// cache; a test that needs it fails without both).

use liederiv::report::EvalRecord;
use liederiv::train::{train, Start, TrainError};
use liederiv::Config;
use std::path::{Path, PathBuf};

/// A tiny ViT on 2,000 training digits; the split cache is shared by the tests of this binary.
fn tiny_cfg(out: &Path, name: &str, extra: &[&str]) -> Config {
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("liederiv-train-cache");
    let mut o: Vec<String> = vec![
        format!("name={name:?}"),
        format!("data.cache_dir={:?}", cache.display().to_string()),
        "data.train_size=2000".into(),
        "data.val_size=0".into(),
        "data.test_size=1000".into(),
        "data.ood=[{name=\"fashion\", path=\"fashion-mnist\", rotate=true, limit=500}]".into(),
        "model.vit.patch_size=7".into(),
        "model.vit.dim=32".into(),
        "model.vit.depth=2".into(),
        "model.vit.heads=2".into(),
        "model.vit.pool=\"mean\"".into(),
        "train.batch_size=32".into(),
        "train.base_lr=4e-3".into(),
        "train.min_lr=1e-5".into(),
        "train.warmup_steps=20".into(),
        "train.grad_clip=1.0".into(),
        "eval.splits=[\"test\"]".into(),
        "eval.limit=500".into(),
        "lee.transforms=[\"rotate\", \"translate_x\"]".into(),
        "lee.splits=[\"train\", \"test\", \"ood_fashion\"]".into(),
        "lee.limit=64".into(),
        format!("output.dir={:?}", out.display().to_string()),
        "output.progress=false".into(),
        "output.plots=false".into(),
    ];
    o.extend(extra.iter().map(|s| s.to_string()));
    match Config::resolve_str("", "tiny", &o) {
        Ok(c) => c,
        Err(e) => panic!("test config: {e}"),
    }
}

/// Rewrite a checkpoint's JSON sidecar through `edit` (to fake what an older or longer run wrote).
fn edit_sidecar(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> anyhow::Result<()> {
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    edit(&mut json);
    std::fs::write(path, serde_json::to_string(&json)?)?;
    Ok(())
}

fn records(dir: &Path) -> Vec<EvalRecord> {
    match liederiv::report::read_jsonl(&dir.join("metrics.jsonl")) {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn training_reaches_accuracy_with_finite_lee_on_every_split() -> anyhow::Result<()> {
    let out = tempfile::tempdir()?;
    let cfg = tiny_cfg(
        out.path(),
        "acc",
        &["train.steps=300", "train.eval_every=150", "train.checkpoint_every=300"],
    );
    let t0 = std::time::Instant::now();
    let summary = train(&cfg, Start::New)?;
    eprintln!("300 steps + 2 evals in {:.1} s", t0.elapsed().as_secs_f64());
    let recs = records(&summary.run_dir);
    assert_eq!(recs.iter().map(|r| r.step).collect::<Vec<_>>(), vec![0, 150, 300]);
    // Step 0 is the untrained model: no training loss yet, accuracy near chance, LEE everywhere.
    let first = &recs[0];
    assert_eq!((first.train_loss, first.epoch), (None, 0.0));
    assert!(first.splits["test"].accuracy.is_some_and(|a| a < 0.25));
    for split in ["train", "test", "ood_fashion"] {
        assert!(first.splits[split].lee["rotate"].mean.is_finite(), "{split}");
    }
    let last = recs.last().cloned().ok_or_else(|| anyhow::anyhow!("no records"))?;
    let acc = last.splits["test"].accuracy.unwrap_or(0.0);
    eprintln!("test accuracy {acc:.3}");
    assert!(acc > 0.25, "test accuracy {acc} is not well above chance (0.1)");
    assert_eq!(last.splits["test"].n, 1000, "the final eval uses the whole split");
    for split in ["train", "test", "ood_fashion"] {
        for t in ["rotate", "translate_x"] {
            let v = last.splits[split].lee.get(t).map(|m| (m.mean, m.n));
            assert!(
                matches!(v, Some((m, 64)) if m.is_finite() && m > 0.0),
                "{split} {t}: {v:?}"
            );
        }
    }
    assert!(last.gaps().contains_key("ood_fashion_minus_train_lee_rotate"));
    assert!(summary.run_dir.join("config.toml").exists() && summary.run_dir.join("metrics.csv").exists());
    Ok(())
}

/// Train `common` uninterrupted (`<tag>_whole`), and again killed after the first checkpoint
/// of `stage` ("train", or "pretrain" for the MAE stage in `pretrain/`) and resumed
/// (`<tag>_killed`). A resume, not a restart: the resumed process says it resumes at the
/// checkpoint's step and runs exactly the steps left, and the records the killed process wrote
/// up to that step stay byte for byte (their images/s are the killed process's own, which a
/// rerun would not reproduce). The run ends with the uninterrupted run's metrics (but images/s),
/// TensorBoard events and weights, in both stages.
fn kill_and_resume(tag: &str, common: &[&str], stage: &str) -> anyhow::Result<()> {
    let out = tempfile::tempdir()?;
    let whole = train(&tiny_cfg(out.path(), &format!("{tag}_whole"), common), Start::New)?;
    let cfg = tiny_cfg(out.path(), &format!("{tag}_killed"), common);
    let killed = cfg.run_dir();
    let sub = |dir: &Path| {
        if stage == "pretrain" {
            dir.join("pretrain")
        } else {
            dir.to_path_buf()
        }
    };
    let sets: Vec<String> = tiny_set_args(&cfg);
    let bin = env!("CARGO_BIN_EXE_liederiv");
    let t0 = std::time::Instant::now();
    let mut child = std::process::Command::new(bin)
        .arg("train")
        .args(&sets)
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let side = sub(&killed).join("checkpoint.json");
    while !side.exists() && t0.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill()?;
    child.wait()?;
    let meta = checkpoint::load_meta(&sub(&killed).join("checkpoint.safetensors"))?;
    assert!(
        meta.step < meta.total_steps,
        "the {stage} stage finished before it could be killed (step {})",
        meta.step
    );
    let lifetime = t0.elapsed().as_secs_f64();
    let spent = meta.wall_time_s.unwrap_or(f64::NAN);
    assert!(
        spent > 0.0 && spent <= lifetime,
        "the checkpoint's wall time {spent} s is not the killed process's (it lived {lifetime} s)"
    );
    // The resumed run adds its own time to the checkpoint's: pretend the killed process spent
    // 1000 s more, so a resume that starts its clock from 0 cannot pass.
    let carried = spent + 1000.0;
    edit_sidecar(&side, |json| json["wall_time_s"] = carried.into())?;
    let before: Vec<String> = std::fs::read_to_string(sub(&killed).join("metrics.jsonl"))?
        .lines()
        .filter(|l| serde_json::from_str::<EvalRecord>(l).is_ok_and(|r| r.step <= meta.step))
        .map(String::from)
        .collect();
    let t1 = std::time::Instant::now();
    let resumed = std::process::Command::new(bin)
        .arg("train")
        .args(&sets)
        .arg("--resume")
        .output()?;
    let resumed_s = t1.elapsed().as_secs_f64();
    let err = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{err}");
    let summary_wall = || -> anyhow::Result<f64> {
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(killed.join("summary.json"))?)?;
        Ok(json["wall_time_s"].as_f64().unwrap_or(f64::NAN))
    };
    let final_wall = checkpoint::load_meta(&killed.join("checkpoint.safetensors"))?
        .wall_time_s
        .unwrap_or(f64::NAN);
    for (what, wall) in [("summary.json", summary_wall()?), ("the final checkpoint", final_wall)] {
        assert!(
            wall > carried && wall <= carried + resumed_s,
            "{what}: wall time {wall} s, expected the checkpoint's {carried} s plus at most this process's {resumed_s} s"
        );
    }
    // Resumed once more, the finished run trains nothing and keeps its time.
    let again = std::process::Command::new(bin)
        .arg("train")
        .args(&sets)
        .arg("--resume")
        .output()?;
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert_eq!(
        summary_wall()?,
        final_wall,
        "a finished run resumed again changed its wall time"
    );
    let said = format!("{stage}: resuming at step {} of {}", meta.step, meta.total_steps);
    let ran = format!("{stage}: ran {} steps in this process", meta.total_steps - meta.step);
    assert!(
        err.contains(&said) && err.contains(&ran),
        "expected {said:?} and {ran:?} in:\n{err}"
    );
    let after = std::fs::read_to_string(sub(&killed).join("metrics.jsonl"))?;
    let kept: Vec<&str> = after.lines().take(before.len()).collect();
    assert_eq!(kept, before, "records written before the checkpoint were rewritten");

    let strip = |mut v: Vec<EvalRecord>| {
        for r in &mut v {
            r.images_per_sec = 0.0;
        }
        v
    };
    let dev = Device::Cpu;
    let stages: &[&str] = if stage == "pretrain" {
        &["pretrain", "train"]
    } else {
        &["train"]
    };
    for &st in stages {
        let at = |dir: &Path| {
            if st == "pretrain" {
                dir.join("pretrain")
            } else {
                dir.to_path_buf()
            }
        };
        let (a, b) = (strip(records(&at(&whole.run_dir))), strip(records(&at(&killed))));
        assert!(!a.is_empty());
        assert_eq!(a, b, "{st}: resumed metrics differ from the uninterrupted run");
        // TensorBoard: the same events, each step once.
        let events = |dir: &Path| -> Vec<(i64, Vec<(String, f32)>)> {
            let files = event_files(dir);
            assert_eq!(files.len(), 1, "{files:?}");
            liederiv::report::tensorboard::read_events(&files[0])
                .unwrap()
                .into_iter()
                .filter(|e| e.file_version.is_none())
                .map(|e| (e.step, e.scalars))
                .collect()
        };
        let (ea, eb) = (events(&at(&whole.run_dir)), events(&at(&killed)));
        assert_eq!(ea.len(), a.len());
        assert_eq!(
            ea, eb,
            "{st}: resumed TensorBoard events differ from the uninterrupted run"
        );
        let wa = candle_core::safetensors::load(at(&whole.run_dir).join("checkpoint.safetensors"), &dev)?;
        let wb = candle_core::safetensors::load(at(&killed).join("checkpoint.safetensors"), &dev)?;
        assert_eq!(wa.len(), wb.len());
        for (k, t) in &wa {
            let d = (t - &wb[k])?
                .to_dtype(DType::F32)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert_eq!(d, 0.0, "{st}: {k} differs after resume");
        }
    }
    Ok(())
}

#[test]
fn resume_after_a_kill_is_bit_identical() -> anyhow::Result<()> {
    let common = [
        "train.steps=120",
        "train.eval_every=40",
        "train.checkpoint_every=20",
        "augment.rotate_deg=180",
    ];
    kill_and_resume("vit", &common, "train")
}

#[test]
fn resume_with_grad_checkpointing_is_bit_identical() -> anyhow::Result<()> {
    // Checkpointed blocks with drop path: each backward replays its block's draws, and the
    // resumed run continues the same random stream.
    let common = [
        "train.steps=120",
        "train.eval_every=40",
        "train.checkpoint_every=20",
        "model.vit.drop_path=0.1",
        "train.grad_checkpointing=true",
    ];
    kill_and_resume("vit_ckpt", &common, "train")
}

#[test]
fn resume_on_photos_is_bit_identical() -> anyhow::Result<()> {
    // Photos from a folder with random resized crops and flips, drawn per batch from the run's
    // random stream: a killed and resumed run draws the same crops.
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/photo_folder");
    let folder = format!("data.folder={:?}", folder.display().to_string());
    let common = [
        "data.source=\"folder\"",
        &folder,
        "data.ood=[]",
        "data.image_size=32",
        "data.channels=3",
        "data.mean=[0.485, 0.456, 0.406]",
        "data.std=[0.229, 0.224, 0.225]",
        "model.num_classes=4",
        "model.vit.patch_size=8",
        "augment.random_resized_crop=true",
        "augment.hflip=0.5",
        "lee.splits=[\"test\"]",
        "train.batch_size=8",
        "train.steps=400",
        "train.eval_every=100",
        "train.checkpoint_every=20",
    ];
    kill_and_resume("photos", &common, "train")
}

/// Mixed precision: a quickstart-sized run (MAE pretraining, then fine-tuning) in bf16 ends near
/// the same run in f32, and its checkpoints hold f32 weights and AdamW state.
#[test]
fn bf16_training_ends_near_f32_with_f32_checkpoints() -> anyhow::Result<()> {
    let out = tempfile::tempdir()?;
    let common = [
        "pretrain.enabled=true",
        "pretrain.steps=40",
        "pretrain.batch_size=32",
        "pretrain.warmup_steps=5",
        "init.weights=\"pretrain\"",
        "train.steps=300",
        "train.eval_every=300",
        "train.checkpoint_every=300",
    ];
    let f32_run = train(&tiny_cfg(out.path(), "f32", &common), Start::New)?;
    let mut sets = common.to_vec();
    sets.push("train.precision=\"bf16\"");
    let bf16_run = train(&tiny_cfg(out.path(), "bf16", &sets), Start::New)?;
    let last = |dir: &Path| records(dir).last().cloned().unwrap();
    for stage in ["pretrain", "train"] {
        let at = |d: &Path| {
            if stage == "pretrain" {
                d.join("pretrain")
            } else {
                d.to_path_buf()
            }
        };
        let (a, b) = (last(&at(&f32_run.run_dir)), last(&at(&bf16_run.run_dir)));
        let (la, lb) = (a.train_loss.unwrap(), b.train_loss.unwrap());
        eprintln!("{stage}: final training loss f32 {la:.4}, bf16 {lb:.4}");
        assert!(
            (la - lb).abs() <= 0.02 * la,
            "{stage}: bf16 training loss {lb:.4} is not within 2% of f32's {la:.4}"
        );
        if stage == "train" {
            let (aa, ab) = (a.splits["test"].accuracy.unwrap(), b.splits["test"].accuracy.unwrap());
            eprintln!("test accuracy f32 {aa:.4}, bf16 {ab:.4}");
            assert!((aa - ab).abs() <= 0.03, "test accuracy f32 {aa:.4}, bf16 {ab:.4}");
        }
        let weights =
            candle_core::safetensors::load(at(&bf16_run.run_dir).join("checkpoint.safetensors"), &Device::Cpu)?;
        assert!(weights.len() > 10);
        // (`optim.step` is the f64 step counter.)
        for (k, t) in weights.iter().filter(|(k, _)| *k != "optim.step") {
            assert_eq!(t.dtype(), DType::F32, "{stage}: {k} is stored as {:?}", t.dtype());
        }
    }
    Ok(())
}

#[test]
fn resume_of_a_batch_norm_model_is_bit_identical() -> anyhow::Result<()> {
    // Batch norm: the running statistics are variables too, and must continue exactly.
    let common = [
        "model.kind=\"cnn\"",
        "model.cnn.widths=[8, 16]",
        "train.steps=60",
        "train.eval_every=20",
        "train.checkpoint_every=10",
    ];
    kill_and_resume("cnn", &common, "train")
}

#[test]
fn resume_inside_the_pretrain_stage_is_bit_identical() -> anyhow::Result<()> {
    // Killed during MAE pretraining: that stage resumes, then fine-tuning runs in full.
    let common = [
        "pretrain.enabled=true",
        "pretrain.steps=60",
        "pretrain.batch_size=32",
        "pretrain.warmup_steps=5",
        "init.weights=\"pretrain\"",
        "train.steps=20",
        "train.eval_every=10",
        "train.checkpoint_every=10",
    ];
    kill_and_resume("mae", &common, "pretrain")
}

/// The `--set` arguments that reproduce a test config on the command line.
fn tiny_set_args(cfg: &Config) -> Vec<String> {
    // The resolved config, written as a file, is the exact same run.
    let path = PathBuf::from(&cfg.output.dir).join(format!("{}.toml", cfg.name));
    std::fs::create_dir_all(&cfg.output.dir).ok();
    std::fs::write(&path, cfg.to_toml()).ok();
    vec!["--config".into(), path.display().to_string()]
}

#[test]
fn evaluation_logits_hold_no_graph() -> anyhow::Result<()> {
    // Logits kept across eval batches must not keep each batch's forward graph alive: on the 50k
    // test set that graph is ~20 GB for the tiny ViT (a Table 1 run was OOM-killed by it).
    let out = tempfile::tempdir()?;
    let cfg = tiny_cfg(out.path(), "eval_graph", &["eval.batch_size=128"]);
    let (_varmap, model) = liederiv::models::build_model(&cfg, &Device::Cpu)?;
    let test = liederiv::data::load_split(&cfg, "test")?;
    let (logits, labels) = liederiv::train::evaluate::logits_of(model.as_ref(), &test, 300, &cfg, &Device::Cpu)?;
    assert_eq!(logits.dims(), [300, 10]);
    assert_eq!(labels.dims(), [300]);
    assert!(!logits.track_op(), "eval logits still reference the forward graph");
    // The model itself is trainable: its raw output does track the graph, so the check can fail.
    let (x, _) = liederiv::train::evaluate::head_of(&test, 4, &cfg, &Device::Cpu)?;
    assert!(model.forward(&x)?.track_op());
    Ok(())
}

#[test]
fn frozen_model_matches_and_follows_its_variables_without_a_graph() -> anyhow::Result<()> {
    // Inference (evaluation, `lee`, `eval`) runs on detached views of the variables: same
    // numbers, no autograd graph (so a JVP frees its activations), and an optimiser step on the
    // variables shows up in the views without rebuilding them.
    let out = tempfile::tempdir()?;
    let cfg = tiny_cfg(out.path(), "frozen", &[]);
    let (varmap, model) = liederiv::models::build_model(&cfg, &Device::Cpu)?;
    let frozen = liederiv::models::frozen(&cfg, &varmap, &Device::Cpu)?;
    let test = liederiv::data::load_split(&cfg, "test")?;
    let (x, _) = liederiv::train::evaluate::head_of(&test, 8, &cfg, &Device::Cpu)?;
    let dx = Tensor::stack(&[&x.sqr()?, &x.neg()?], 0)?; // two tangents, (2, B, C, H, W)
    let (y, dy) = model.jvp(&x, &dx, &mut liederiv::jvp::Tape::off())?;
    let (fy, fdy) = frozen.jvp(&x, &dx, &mut liederiv::jvp::Tape::off())?;
    assert_eq!((&y - &fy)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
    // The tangents differ by rounding only: the frozen JVP runs the fused inference kernels, the
    // trainable one their composed, differentiable forms (tests/fused.rs holds the two together).
    let scale = dy.abs()?.max_all()?.to_scalar::<f32>()?;
    let e = (&dy - &fdy)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(e <= 1e-5 * scale, "frozen JVP tangent differs by {e} (scale {scale})");
    assert!(
        dy.track_op(),
        "the trainable model's JVP joins the graph, so the next check can fail"
    );
    assert!(
        !fdy.track_op() && !fy.track_op(),
        "the frozen model's JVP built an autograd graph"
    );

    let head = varmap.data().lock().unwrap()["head.weight"].clone();
    head.set(&(head.as_tensor() * 2.0)?)?;
    let rebuilt = liederiv::models::build_with(&cfg, &varmap, DType::F32, &Device::Cpu)?.forward(&x)?;
    let after = frozen.forward(&x)?;
    assert!(
        (&after - &fy)?.abs()?.max_all()?.to_scalar::<f32>()? > 1e-3,
        "the update did not reach the views"
    );
    assert_eq!((&after - &rebuilt)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
    Ok(())
}

/// The batch-norm models (a small CNN and G-CNN): kind, config, variables, model and `images`
/// test digits.
type BnCase = (&'static str, Config, VarMap, Box<dyn liederiv::models::Model>, Tensor);
fn batch_norm_models(out: &Path, images: usize) -> anyhow::Result<Vec<BnCase>> {
    let mut cases = Vec::new();
    for (kind, size) in [("cnn", "model.cnn.widths=[4, 8]"), ("gcnn", "model.gcnn.widths=[2, 3]")] {
        let cfg = tiny_cfg(out, kind, &[&format!("model.kind={kind:?}"), size]);
        let (varmap, model) = liederiv::models::build_model(&cfg, &Device::Cpu)?;
        let test = liederiv::data::load_split(&cfg, "test")?;
        let (x, _) = liederiv::train::evaluate::head_of(&test, images, &cfg, &Device::Cpu)?;
        cases.push((kind, cfg, varmap, model, x));
    }
    Ok(cases)
}

#[test]
fn frozen_batch_norm_models_follow_the_running_statistics() -> anyhow::Result<()> {
    // The CNN and G-CNN also carry state that training writes outside the optimiser: batch-norm
    // running statistics. A frozen model built before training must evaluate with the current
    // ones, exactly as a model rebuilt from the variables now (it once kept a copy made when it
    // was built).
    let out = tempfile::tempdir()?;
    for (kind, cfg, varmap, model, x) in batch_norm_models(out.path(), 16)? {
        let frozen = liederiv::models::frozen(&cfg, &varmap, &Device::Cpu)?;
        let before = frozen.forward(&x)?;
        let mut rng = liederiv::models::Rng::seed_from_u64(0);
        for _ in 0..3 {
            model.forward_train(&((&x * 3.0)? + 0.5)?, &mut rng)?; // moves the running statistics
        }
        let after = frozen.forward(&x)?;
        let rebuilt = liederiv::models::build_with(&cfg, &varmap, DType::F32, &Device::Cpu)?.forward(&x)?;
        let moved = (&after - &before)?.abs()?.max_all()?.to_scalar::<f32>()?;
        println!("{kind}: frozen logits moved by {moved:.3e} after three train-mode passes");
        assert!(moved > 1e-3, "{kind}: the statistics did not reach the frozen model");
        assert_eq!(
            (&after - &rebuilt)?.abs()?.max_all()?.to_scalar::<f32>()?,
            0.0,
            "{kind}"
        );
        // And inference-only models refuse to train (they would write through the views).
        let err = frozen.forward_train(&x, &mut rng).expect_err("a frozen model trained");
        assert!(err.to_string().contains("inference-only"), "{kind}: {err}");
    }
    Ok(())
}

#[test]
fn lee_penalty_leaves_batch_norm_statistics_to_the_forward_pass() -> anyhow::Result<()> {
    // The LEE penalty's JVP runs batch norm in eval mode, on the running statistics. They are
    // buffers: they must get no gradient, and the optimiser must not own them (once it did, and
    // AdamW with weight decay drove them to garbage: evaluation of a penalised CNN at chance).
    let out = tempfile::tempdir()?;
    for (kind, cfg, varmap, model, x) in batch_norm_models(out.path(), 8)? {
        let rotate = [liederiv::transforms::Transform::Rotate];
        let penalty = liederiv::lie::lee_penalty(
            model.as_ref(),
            &x,
            &rotate,
            liederiv::transforms::Stencil::Central,
            liederiv::lie::LeeOutput::Probs,
        )?;
        let grads = penalty.backward()?;
        let data = varmap.data().lock().unwrap();
        let (mut buffers, mut with_grad) = (0, 0);
        for (name, var) in data.iter() {
            let g = grads.get(var.as_tensor());
            if liederiv::models::conv::is_buffer(name) {
                buffers += 1;
                assert!(g.is_none(), "{kind}: buffer {name} got a gradient from the LEE penalty");
            } else if g.is_some() {
                with_grad += 1;
            }
        }
        drop(data);
        assert!(
            buffers > 0 && with_grad > 0,
            "{kind}: {buffers} buffers, {with_grad} parameters with gradients"
        );
        let opt = AdamW::new(&varmap, AdamWParams::from_train(&cfg.train), None)?;
        let owned: Vec<String> = opt.groups().into_iter().map(|(n, _)| n).collect();
        assert!(
            owned.iter().all(|n| !liederiv::models::conv::is_buffer(n)) && !owned.is_empty(),
            "{kind}: the optimiser owns batch-norm buffers: {owned:?}"
        );
    }
    Ok(())
}

#[test]
fn lee_penalty_lowers_test_lee() -> anyhow::Result<()> {
    let out = tempfile::tempdir()?;
    let common = [
        "train.steps=150",
        "train.eval_every=150",
        "train.checkpoint_every=150",
        "train.lee_penalty_transforms=[\"rotate\"]",
    ];
    let lee_of = |name: &str, lambda: &str, images: usize| -> anyhow::Result<f64> {
        let mut extra = common.to_vec();
        let set = format!("train.lee_penalty={lambda}");
        let sub = format!("train.lee_penalty_images={images}");
        extra.push(&set);
        extra.push(&sub);
        let s = train(&tiny_cfg(out.path(), name, &extra), Start::New)?;
        let last = records(&s.run_dir).pop().ok_or_else(|| anyhow::anyhow!("no records"))?;
        Ok(last.splits["test"].lee["rotate"].mean)
    };
    let plain = lee_of("plain", "0", 0)?;
    let penalised = lee_of("penalised", "100", 0)?;
    // The penalty on the first 8 of each batch of 32 (what Table 1 uses to afford it).
    let subset = lee_of("subset", "100", 8)?;
    eprintln!("test rotate LEE: λ=0 {plain:.3e}, λ=100 {penalised:.3e}, λ=100 on 8 of 32 {subset:.3e}");
    assert!(
        penalised < 0.7 * plain,
        "penalty did not lower test LEE: {penalised} vs {plain}"
    );
    assert!(
        subset < 0.7 * plain,
        "penalty on a subset did not lower test LEE: {subset} vs {plain}"
    );
    // A subset larger than the batch is a config error naming the key.
    let e = Config::resolve_str("[train]\nbatch_size = 16\nlee_penalty_images = 32\n", "bad.toml", &[])
        .err()
        .map(|e| e.to_string());
    assert!(
        e.as_deref().is_some_and(|e| e.contains("train.lee_penalty_images")),
        "{e:?}"
    );
    Ok(())
}

#[test]
fn bad_inputs_fail_before_training() -> anyhow::Result<()> {
    // A negative learning rate is a config error naming the key.
    let e = Config::resolve_str("[train]\nbase_lr = -1\n", "bad.toml", &[])
        .err()
        .map(|e| e.to_string());
    assert!(
        e.as_deref()
            .is_some_and(|e| e.contains("train.base_lr") && e.contains("out of range")),
        "{e:?}"
    );
    let e = Config::resolve_str("[train]\nlr = -1\n", "bad.toml", &[])
        .err()
        .map(|e| e.to_string());
    assert!(e.as_deref().is_some_and(|e| e.contains("train.lr")), "{e:?}");

    // --resume without a checkpoint.
    let out = tempfile::tempdir()?;
    let cfg = tiny_cfg(out.path(), "fresh", &["train.steps=5"]);
    match train(&cfg, Start::Resume) {
        Err(e @ TrainError::NoCheckpoint { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("checkpoint.safetensors") && msg.contains("without --resume"),
                "{msg}"
            );
        }
        other => panic!("expected NoCheckpoint, got {:?}", other.map(|_| ()).err()),
    }
    assert!(
        !out.path().join("fresh").join("metrics.jsonl").exists(),
        "training started"
    );

    // An unwritable run directory (its parent is a regular file).
    let blocker = out.path().join("not-a-dir");
    std::fs::write(&blocker, "x")?;
    let mut cfg = tiny_cfg(out.path(), "x", &["train.steps=5"]);
    cfg.output.dir = blocker.display().to_string();
    match train(&cfg, Start::New) {
        Err(e @ TrainError::RunDir { .. }) => assert!(e.to_string().contains("not-a-dir"), "{e}"),
        other => panic!("expected RunDir, got {:?}", other.map(|_| ()).err()),
    }
    Ok(())
}

#[test]
fn a_diverging_run_stops_with_the_step_and_keeps_its_checkpoint() -> anyhow::Result<()> {
    let out = tempfile::tempdir()?;
    let cfg = tiny_cfg(
        out.path(),
        "nan",
        &[
            "train.steps=200",
            "train.base_lr=1e33",
            "train.warmup_steps=0",
            "train.grad_clip=0.0",
            "train.checkpoint_every=1",
            "train.eval_every=1000",
        ],
    );
    match train(&cfg, Start::New) {
        Err(TrainError::NonFinite {
            step, checkpoint: ckpt, ..
        }) => {
            let meta = checkpoint::load_meta(Path::new(&ckpt))?;
            assert_eq!(meta.step, step - 1, "the kept checkpoint is the last good step");
        }
        other => panic!("expected a non-finite loss, got {:?}", other.map(|_| ()).err()),
    }
    Ok(())
}

/// Every file under `dir` with its bytes, for before/after comparisons.
fn snapshot(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// `liederiv <args>`; (stdout, stderr, success).
fn cli(args: &[String]) -> (String, String, bool) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_liederiv"))
        .args(args)
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    )
}

#[test]
fn a_folder_holding_a_run_is_never_overwritten() -> anyhow::Result<()> {
    let out = tempfile::tempdir()?;
    let steps = ["train.steps=6", "train.eval_every=3", "train.checkpoint_every=3"];
    let cfg = tiny_cfg(out.path(), "kept", &steps);
    train(&cfg, Start::New)?;
    let dir = cfg.run_dir();
    let before = snapshot(&dir);
    assert!(before.len() >= 5, "{:?}", before.keys());
    let args = |extra: &[&str]| {
        let mut a = vec!["train".to_string()];
        a.extend(tiny_set_args(&cfg));
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };

    // The same command again: refused, naming the folder, its progress and the three ways on.
    let (_, err, ok) = cli(&args(&[]));
    assert!(!ok, "a second run into the same folder was not refused");
    for needle in [
        dir.display().to_string().as_str(),
        "step 6 of 6",
        "--resume",
        "--set name=",
        "--overwrite",
    ] {
        assert!(err.contains(needle), "refusal lacks {needle:?}: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(snapshot(&dir), before, "the refused command changed the old run");
    // The library refuses the same way.
    assert!(matches!(train(&cfg, Start::New), Err(TrainError::RunExists { .. })));
    assert_eq!(snapshot(&dir), before);

    // Way 1: --resume continues it (finished: nothing is trained again, no record added).
    let (_, err, ok) = cli(&args(&["--resume"]));
    assert!(ok, "{err}");
    assert_eq!(
        std::fs::read(dir.join("metrics.jsonl"))?,
        before[&dir.join("metrics.jsonl")]
    );
    assert_eq!(
        std::fs::read(dir.join("checkpoint.safetensors"))?,
        before[&dir.join("checkpoint.safetensors")]
    );

    // Way 2: another name starts a run beside it.
    let (_, err, ok) = cli(&args(&["--set", "name=\"beside\""]));
    assert!(ok, "{err}");
    assert!(out.path().join("beside").join("checkpoint.safetensors").exists());
    assert_eq!(records(&dir).len(), 3);

    // Way 3: --overwrite deletes the old run (a file a user left there goes with it) and starts
    // over; the run is deterministic, so its records come back the same.
    std::fs::write(dir.join("note.txt"), "mine")?;
    let (_, err, ok) = cli(&args(&["--overwrite"]));
    assert!(ok, "{err}");
    assert!(
        err.contains("--overwrite: deleting what it held: a run (training finished"),
        "{err}"
    );
    assert!(!dir.join("note.txt").exists());
    assert_eq!(records(&dir).iter().map(|r| r.step).collect::<Vec<_>>(), vec![0, 3, 6]);
    assert!(!cli(&["train".into(), "--resume".into(), "--overwrite".into()]).2);
    Ok(())
}

#[test]
fn non_finite_numbers_are_config_errors() {
    for (set, key) in [
        ("data.mean=nan", "data.mean"),
        ("train.base_lr=inf", "train.base_lr"),
        ("augment.rotate_deg=-inf", "augment.rotate_deg"),
        ("train.lee_penalty=nan", "train.lee_penalty"),
    ] {
        let e = Config::resolve_str("", "<test>", &[set.to_string()])
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|e| e.contains(key) && e.contains("finite")),
            "{set}: {e:?}"
        );
    }
    let (_, err, ok) = cli(&[
        "train".into(),
        "--set".into(),
        "data.mean=nan".into(),
        "--dry-run".into(),
    ]);
    assert!(!ok && err.contains("data.mean") && err.contains("finite"), "{err}");
}

#[test]
fn lee_and_eval_measure_the_trained_checkpoint() -> anyhow::Result<()> {
    let out = tempfile::tempdir()?;
    let steps = [
        "train.steps=4",
        "train.eval_every=4",
        "train.checkpoint_every=4",
        "lee.limit=16",
        "eval.limit=64",
    ];
    let cfg = tiny_cfg(out.path(), "measured", &steps);
    let config = tiny_set_args(&cfg);
    let lee = |extra: &[&str], json: &Path| {
        let mut a = vec!["lee".to_string()];
        a.extend(config.clone());
        a.extend([
            "--json".to_string(),
            json.display().to_string(),
            "--splits".into(),
            "test".into(),
        ]);
        a.extend(extra.iter().map(|s| s.to_string()));
        cli(&a)
    };
    // Before training: the random initial weights, and it says so.
    let (_, err, ok) = lee(&[], &out.path().join("init.json"));
    assert!(ok, "{err}");
    assert!(err.contains("random initial weights"), "{err}");

    let run = train(&cfg, Start::New)?;
    let ckpt = run.run_dir.join("checkpoint.safetensors");
    let (_, err, ok) = lee(&[], &out.path().join("default.json"));
    assert!(ok, "{err}");
    assert!(
        err.contains(&format!("checkpoint {} (train step 4 of 4)", ckpt.display())),
        "{err}"
    );
    let (_, err, ok) = lee(
        &["--checkpoint", &ckpt.display().to_string()],
        &out.path().join("explicit.json"),
    );
    assert!(ok, "{err}");
    let read = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(out.path().join(name)).unwrap()).unwrap()
    };
    let (default, explicit, init) = (read("default.json"), read("explicit.json"), read("init.json"));
    assert_eq!(default["checkpoint"], ckpt.display().to_string());
    assert_eq!(default["splits"], explicit["splits"]);
    assert_ne!(
        default["splits"], init["splits"],
        "the trained model measured like the initial one"
    );
    // The trainer's own final LEE on the same images is what `lee` reports.
    let last = records(&run.run_dir).pop().unwrap();
    let logged = last.splits["test"].lee["rotate"].mean;
    let measured = default["splits"]["test"]["lee"]["rotate"]["mean"].as_f64().unwrap();
    assert!(
        (logged - measured).abs() <= 1e-6 * logged.abs(),
        "{logged} vs {measured}"
    );

    // eval: the same default, and a checkpoint of another model is a checked error.
    let mut a = vec!["eval".to_string()];
    a.extend(config.clone());
    let (_, err, ok) = cli(&a);
    assert!(ok && err.contains("train step 4 of 4"), "{err}");
    a.extend(["--set".into(), "model.vit.dim=48".into()]);
    a.extend(["--checkpoint".into(), ckpt.display().to_string()]);
    let (_, err, ok) = cli(&a);
    assert!(
        !ok && err.contains("does not fit this model") && !err.contains("panicked"),
        "{err}"
    );

    // A config that starts from its own MAE pretraining, which has not run: an error, not a
    // silently random model.
    let mut a = vec!["lee".to_string()];
    a.extend(config.clone());
    a.extend(
        [
            "--set",
            "name=\"never_pretrained\"",
            "--set",
            "pretrain.enabled=true",
            "--set",
            "init.weights=\"pretrain\"",
        ]
        .map(String::from),
    );
    let (_, err, ok) = cli(&a);
    assert!(!ok, "measured a model whose pretraining never ran");
    assert!(err.contains("has not run") && err.contains("random"), "{err}");
    Ok(())
}

/// The TensorBoard event files of a run folder.
fn event_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("events.out.tfevents."))
        .collect()
}

#[test]
fn tensorboard_events_hold_every_evaluation() -> anyhow::Result<()> {
    let out = tempfile::tempdir()?;
    let cfg = tiny_cfg(
        out.path(),
        "tb",
        &["train.steps=6", "train.eval_every=3", "train.checkpoint_every=6"],
    );
    let run = train(&cfg, Start::New)?;
    let files = event_files(&run.run_dir);
    assert_eq!(files.len(), 1, "{files:?}");
    let events = liederiv::report::tensorboard::read_events(&files[0])?;
    assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
    let recs = records(&run.run_dir);
    assert_eq!(events.len(), 1 + recs.len());
    for (e, r) in events[1..].iter().zip(&recs) {
        assert_eq!(e.step, r.step as i64);
        let tags: std::collections::BTreeMap<&str, f32> = e.scalars.iter().map(|(t, x)| (t.as_str(), *x)).collect();
        assert_eq!(
            tags.get("train/loss").copied(),
            r.train_loss.map(|l| l as f32),
            "step {}",
            r.step
        );
        assert_eq!(tags["train/lr"], r.lr as f32);
        assert_eq!(tags["accuracy/test"], r.splits["test"].accuracy.unwrap() as f32);
        for split in ["train", "test", "ood_fashion"] {
            let tag = format!("lee_rotate/{split}");
            assert_eq!(tags[tag.as_str()], r.splits[split].lee["rotate"].mean as f32, "{tag}");
        }
        assert_eq!(
            tags["gap/ood_fashion_minus_train_lee_rotate"],
            r.gaps()["ood_fashion_minus_train_lee_rotate"] as f32
        );
    }
    // output.tensorboard = false writes none.
    let off = train(
        &tiny_cfg(out.path(), "no_tb", &["train.steps=3", "output.tensorboard=false"]),
        Start::New,
    )?;
    assert!(event_files(&off.run_dir).is_empty());
    Ok(())
}

#[test]
fn a_checkpoint_from_before_a_config_key_existed_still_resumes() -> anyhow::Result<()> {
    // Checkpoints store the resolved config as text; one written before `output.tensorboard`
    // and `data.offline` existed lacks those lines, and must resume as if they had their defaults.
    let out = tempfile::tempdir()?;
    let cfg = tiny_cfg(
        out.path(),
        "old",
        &["train.steps=4", "train.eval_every=2", "train.checkpoint_every=2"],
    );
    train(&cfg, Start::New)?;
    edit_sidecar(&cfg.run_dir().join("checkpoint.json"), |meta| {
        let text = meta["config"].as_str().unwrap_or_default().to_string();
        let older: String = text
            .lines()
            .filter(|l| !l.starts_with("tensorboard =") && !l.starts_with("offline ="))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(older.len() < text.len());
        meta["config"] = older.into();
    })?;
    train(&cfg, Start::Resume)?;
    // A real change of config is still refused.
    let changed = tiny_cfg(
        out.path(),
        "old",
        &[
            "train.steps=4",
            "train.eval_every=2",
            "train.checkpoint_every=2",
            "seed=9",
        ],
    );
    assert!(matches!(
        train(&changed, Start::Resume),
        Err(TrainError::ConfigChanged { .. })
    ));
    Ok(())
}

#[test]
fn averaging_a_trained_vit_over_c4_lowers_its_rotation_lee() -> anyhow::Result<()> {
    // `model.average_rotations = 4` on the weights of a trained ViT: the same checkpoint, measured
    // as is and averaged over the four rotations; averaging removes the non-invariant part.
    let out = tempfile::tempdir()?;
    let cfg = tiny_cfg(
        out.path(),
        "avg",
        &["train.steps=150", "train.eval_every=150", "train.checkpoint_every=150"],
    );
    let run = train(&cfg, Start::New)?;
    let ckpt = run.run_dir.join("checkpoint.safetensors");
    let dev = Device::Cpu;
    let test = liederiv::data::load_split(&cfg, "test")?;
    let (x, y) = liederiv::train::evaluate::head_of(&test, 64, &cfg, &dev)?;
    let spec = liederiv::lie::LeeSpec::of(&cfg.lee);
    let lee = |c: &Config| -> anyhow::Result<f64> {
        let loaded = liederiv::train::load_for_inference(c, Some(&ckpt), &dev)?;
        let model = liederiv::models::frozen(c, &loaded.varmap, &dev)?;
        let s = liederiv::lie::lee_split(model.as_ref(), &x, Some(&y), &spec)?;
        Ok(s.lee[0].1.mean())
    };
    let mut averaged = cfg.clone();
    averaged.model.average_rotations = 4;
    let (plain, avg) = (lee(&cfg)?, lee(&averaged)?);
    eprintln!("test rotation LEE: plain {plain:.3e}, averaged over C4 {avg:.3e}");
    assert_eq!(spec.transforms[0], liederiv::transforms::Transform::Rotate);
    assert!(
        avg < plain,
        "averaging did not lower the rotation LEE: {avg} vs {plain}"
    );
    Ok(())
}

#[test]
fn fine_tuning_starts_from_the_pretrained_encoder() -> anyhow::Result<()> {
    // The hand-over of MAE pretraining to fine-tuning: the classifier's encoder is the pretrain
    // checkpoint's, tensor for tensor, and only the head and fc_norm are new. One fine-tuning
    // step at an lr of 1e-12 × 32/256 (Adam moves each weight by at most that) lets the
    // fine-tuning checkpoint show the weights it started from.
    let out = tempfile::tempdir()?;
    let cfg_extra = [
        "pretrain.enabled=true",
        "pretrain.steps=20",
        "pretrain.batch_size=32",
        "pretrain.warmup_steps=1",
        "init.weights=\"pretrain\"",
        "train.steps=1",
        "train.base_lr=1e-12",
        "train.min_lr=0",
        "train.weight_decay=0",
        "train.eval_every=1",
        "train.checkpoint_every=1",
    ];
    let cfg = tiny_cfg(out.path(), "handover", &cfg_extra);
    train(&cfg, Start::New)?;
    let load = |p: &str| candle_core::safetensors::load(cfg.run_dir().join(p), &Device::Cpu);
    let (pre, fin) = (
        load("pretrain/checkpoint.safetensors")?,
        load("checkpoint.safetensors")?,
    );
    let mut handed = Vec::new();
    for (name, t) in fin.iter().filter(|(n, _)| !n.starts_with(checkpoint::OPTIM_PREFIX)) {
        let new = name.starts_with("head.") || name.starts_with("fc_norm.");
        match pre.get(name) {
            Some(p) if !new => {
                let diff = (t - p)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                let size = p.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                assert!(
                    diff <= 1e-9 + 1e-6 * size,
                    "{name}: moved {diff:e} from the pretrained encoder"
                );
                assert!(size > 0.0, "{name}: all zero");
                handed.push(name.clone());
            }
            Some(_) => panic!("{name}: a new classifier tensor was taken from the pretraining checkpoint"),
            None => assert!(new, "{name}: neither pretrained nor new"),
        }
    }
    handed.sort();
    // cls token, position embedding, patch embedding, 2 blocks × 12 tensors; the MAE's final
    // norm is not used by a mean-pooled classifier (fc_norm replaces it).
    assert!(handed.iter().any(|n| n.starts_with("blocks.1.")), "{handed:?}");
    assert!(handed.contains(&"patch_embed.proj.weight".to_string()), "{handed:?}");
    assert!(
        handed.len() >= 27,
        "only {} tensors handed over: {handed:?}",
        handed.len()
    );
    // The decoder stays behind.
    assert!(pre.keys().any(|k| k.starts_with("decoder")) && !fin.keys().any(|k| k.starts_with("decoder")));

    // A pretraining stage copied into another run (as scripts/table1.sh gives `mae_vit_lee`
    // its seed's `mae_vit` encoder) is reused but its time is not this run's: say it took
    // 1000 s, and the run that copied it still takes seconds.
    let copy = tiny_cfg(out.path(), "handover_copy", &cfg_extra);
    let copied = copy.run_dir().join("pretrain");
    std::fs::create_dir_all(&copied)?;
    for f in ["checkpoint.safetensors", "checkpoint.json"] {
        std::fs::copy(cfg.run_dir().join("pretrain").join(f), copied.join(f))?;
    }
    edit_sidecar(&copied.join("checkpoint.json"), |json| {
        json["wall_time_s"] = 1000.0.into()
    })?;
    let run = train(&copy, Start::Resume)?;
    let wall = run.wall_time_s.unwrap_or(f64::NAN);
    assert!(
        wall > 0.0 && wall < 1000.0,
        "the copied stage's time was counted: {wall} s"
    );
    Ok(())
}

/// `--set` overrides of a CLI run on `common::mnist_root`'s synthetic digits: a one-block ViT,
/// MAE pretraining and fine-tuning of `steps` steps each.
fn cli_sets(dir: &Path, name: &str, steps: usize) -> Vec<String> {
    let mut sets = common::mnist_root(dir, 40, 24);
    sets.extend([
        format!("name={name:?}"),
        "model.vit.patch_size=7".into(),
        "model.vit.dim=16".into(),
        "model.vit.depth=1".into(),
        "model.vit.heads=1".into(),
        "pretrain.enabled=true".into(),
        "init.weights=\"pretrain\"".into(),
        format!("pretrain.steps={steps}"),
        "pretrain.batch_size=8".into(),
        "pretrain.warmup_steps=1".into(),
        format!("train.steps={steps}"),
        "train.batch_size=8".into(),
        "train.warmup_steps=1".into(),
        format!("train.eval_every={steps}"),
        format!("train.checkpoint_every={steps}"),
        "eval.splits=[\"test\"]".into(),
        "lee.transforms=[\"rotate\"]".into(),
        "lee.splits=[\"test\"]".into(),
        "lee.limit=4".into(),
    ]);
    sets
}

#[test]
fn without_a_terminal_progress_is_logged_as_line_records() {
    // The test's stderr is a pipe, as under nohup or a cluster job: each stage (MAE pretraining,
    // which has no evaluation table, and fine-tuning) logs a record at every tenth of its steps
    // with the loss, throughput and ETA; `output.progress = false` logs none.
    let dir = tempfile::tempdir().unwrap();
    let mut sets = cli_sets(dir.path(), "logged", 20);
    sets.push("output.progress=true".into());
    let (ok, _, err) = common::liederiv(&["train"], &sets);
    assert!(ok, "{err}");
    for stage in ["pretrain", "train"] {
        let records: Vec<&str> = err
            .lines()
            .filter(|l| l.starts_with(&format!("[progress] {stage}: step ")))
            .collect();
        let steps: Vec<usize> = records
            .iter()
            .map(|l| {
                l.split_whitespace()
                    .nth(3)
                    .unwrap()
                    .split('/')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        assert_eq!(steps, (1..=10).map(|k| 2 * k).collect::<Vec<_>>(), "{stage}:\n{err}");
        for r in &records {
            assert!(
                r.contains("/20 (") && r.contains("  loss ") && r.contains(" img/s  elapsed "),
                "{r}"
            );
            assert!(r.contains("  ETA "), "{r}");
        }
        assert!(records.last().unwrap().ends_with("ETA done"), "{records:?}");
    }
    let mut quiet = cli_sets(dir.path(), "quiet", 4);
    quiet.push("output.progress=false".into());
    let (ok, _, err) = common::liederiv(&["train"], &quiet);
    assert!(ok, "{err}");
    assert!(!err.contains("[progress]"), "{err}");
}

#[test]
fn measurements_of_another_model_in_the_run_folder_stop_a_new_run() {
    // `eval --angles` before the run exists measures the initial weights and says so in the CSV;
    // `train` then refuses the folder (naming what it holds) instead of keeping that curve beside
    // its own files, and `--overwrite` clears it.
    let dir = tempfile::tempdir().unwrap();
    let mut sets = cli_sets(dir.path(), "measured", 2);
    sets.push("pretrain.enabled=false".into());
    sets.push("init.weights=\"random\"".into());
    let (ok, _, err) = common::liederiv(&["eval", "--splits", "test", "--angles", "0:90:45"], &sets);
    assert!(ok, "{err}");
    let run = dir.path().join("runs/measured");
    let csv = std::fs::read_to_string(run.join("angles.csv")).unwrap();
    let first = csv.lines().next().unwrap();
    assert!(
        first.starts_with("# model: the config's random initial weights (seed "),
        "{first}"
    );
    let (ok, _, err) = common::liederiv(&["train"], &sets);
    assert!(!ok);
    assert!(
        err.contains(
            "already holds no run but measurements of another model (angles.csv of the config's random initial weights"
        ),
        "{err}"
    );
    assert!(err.contains("--overwrite"), "{err}");
    assert!(!run.join("checkpoint.safetensors").exists());
    let (ok, _, err) = common::liederiv(&["train", "--overwrite"], &sets);
    assert!(ok, "{err}");
    assert!(!run.join("angles.csv").exists());
    // After training, the curve names the checkpoint and its step.
    let (ok, _, err) = common::liederiv(&["eval", "--splits", "test", "--angles", "0:90:45"], &sets);
    assert!(ok, "{err}");
    let csv = std::fs::read_to_string(run.join("angles.csv")).unwrap();
    let want = format!(
        "# model: checkpoint {} (train step 2 of 2)",
        run.join("checkpoint.safetensors").display()
    );
    assert_eq!(csv.lines().next().unwrap(), want);
}

#[test]
fn eval_as_run_writes_an_evaluation_only_row_that_report_tables() {
    // A trained checkpoint, wrapped with C4 averaging at test time and evaluated like a run's
    // final evaluation (all test digits, LEE on lee.splits), becomes a run folder of its own
    // that `report` reads beside the trained run; an existing folder is refused.
    let dir = tempfile::tempdir().unwrap();
    let mut sets = cli_sets(dir.path(), "trained", 2);
    sets.push("pretrain.enabled=false".into());
    sets.push("init.weights=\"random\"".into());
    sets.push("lee.splits=[\"train\", \"test\"]".into());
    let (ok, _, err) = common::liederiv(&["train"], &sets);
    assert!(ok, "{err}");
    let ckpt = dir.path().join("runs/trained/checkpoint.safetensors");
    let mut avg = sets.clone();
    avg.push("name=\"averaged\"".into());
    avg.push("model.average_rotations=4".into());
    let args = ["eval", "--as-run", "--checkpoint", ckpt.to_str().unwrap()];
    let (ok, _, err) = common::liederiv(&args, &avg);
    assert!(ok, "{err}");
    let run = dir.path().join("runs/averaged");
    let evals = records(&run);
    assert_eq!(evals.len(), 1);
    let r = &evals[0];
    assert_eq!(r.step, 2);
    let test = &r.splits["test"];
    assert_eq!(test.n, 24, "all test digits");
    assert!(test.accuracy.is_some() && test.lee.contains_key("rotate"));
    assert!(r.splits["train"].lee.contains_key("rotate"));
    let cfg = Config::resolve(Some(&run.join("config.toml")), &[]).unwrap();
    assert_eq!((cfg.name.as_str(), cfg.model.average_rotations), ("averaged", 4));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert!(summary["params"].as_u64().unwrap() > 0 && summary["seed"] == 0);
    // The averaged model is C4-invariant: its rotation LEE is below the trained model's.
    let trained = records(&dir.path().join("runs/trained"));
    let lee = |r: &EvalRecord| r.splits["test"].lee["rotate"].mean;
    assert!(
        lee(r) < lee(trained.last().unwrap()),
        "{} vs {}",
        lee(r),
        lee(trained.last().unwrap())
    );
    let md = dir.path().join("table.md");
    let run_dirs = [dir.path().join("runs/trained"), run.clone()];
    let (ok, _, err) = common::liederiv(
        &[
            "report",
            run_dirs[0].to_str().unwrap(),
            run_dirs[1].to_str().unwrap(),
            "--markdown",
            md.to_str().unwrap(),
        ],
        &[],
    );
    assert!(ok, "{err}");
    assert!(std::fs::read_to_string(&md).unwrap().contains("averaged"));
    let (ok, _, err) = common::liederiv(&args, &avg);
    assert!(!ok && err.contains("already exists"), "{err}");
}
