//! timm's ResNet and ConvNeXt against independent oracles: the depthwise conv against candle's
//! grouped conv2d and its composed form (gradients included); random-init timm models saved by
//! timm itself (`scripts/fixtures/make_timm_zoo_fixture.py`, tests/fixtures/timm_zoo/), loaded
//! through the config path: their logits, their LEE against `torch.func.jvp` and the layerwise sum.

mod common;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use common::{fixture, max_abs, max_abs_diff, norm, randn, rel_err, rng};
use liederiv::jvp::Tape;
use liederiv::kernels::{depthwise_conv2d, depthwise_conv2d_composed};
use liederiv::lie::layerwise::decompose;
use liederiv::lie::{lee_per_image, LeeOutput, Statistic};
use liederiv::models::weights::load_timm;
use liederiv::models::{build_model, build_with, Model, Readout};
use liederiv::transforms::{Stencil, Transform};
use liederiv::Config;
use std::collections::HashMap;

const DEV: Device = Device::Cpu;

/// The fused depthwise conv equals candle's grouped conv2d (C groups) and its composed form, and
/// its input and weight gradients equal the composed form's (candle autograd), in f64 and f32.
#[test]
fn depthwise_conv_and_its_gradients_match_grouped_conv2d() {
    let mut r = rng(3);
    for dtype in [DType::F64, DType::F32] {
        let tol = if dtype == DType::F64 { 1e-13 } else { 2e-6 };
        for (c, h, w, k) in [(3usize, 9usize, 7usize, 7usize), (5, 6, 6, 3), (2, 4, 5, 5)] {
            let x = Var::from_tensor(&randn(&[2, c, h, w], 1.0, dtype, &mut r)).unwrap();
            let wt = Var::from_tensor(&randn(&[c, 1, k, k], 0.3, dtype, &mut r)).unwrap();
            let g = randn(&[2, c, h, w], 1.0, dtype, &mut r);
            let fused = depthwise_conv2d(x.as_tensor(), wt.as_tensor(), k / 2).unwrap();
            let composed = depthwise_conv2d_composed(x.as_tensor(), wt.as_tensor(), k / 2).unwrap();
            let candle = x.as_tensor().conv2d(wt.as_tensor(), k / 2, 1, 1, c).unwrap();
            assert_eq!(fused.dims(), candle.dims());
            let (e1, e2) = (rel_err(&fused, &candle), rel_err(&composed, &candle));
            assert!(
                e1 < tol && e2 < tol,
                "{dtype:?} {c}×{h}×{w} k{k}: fused {e1:e}, composed {e2:e}"
            );
            let grads = |y: &Tensor| {
                let gr = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
                (
                    gr.get(x.as_tensor()).unwrap().clone(),
                    gr.get(wt.as_tensor()).unwrap().clone(),
                )
            };
            let ((fx, fw), (cx, cw)) = (grads(&fused), grads(&composed));
            let (ex, ew) = (rel_err(&fx, &cx), rel_err(&fw, &cw));
            println!("{dtype:?} {c}×{h}×{w} k{k}: forward {e1:.1e}, dx {ex:.1e}, dw {ew:.1e}");
            assert!(ex < tol && ew < tol, "{dtype:?} {c}×{h}×{w} k{k}: dx {ex:e}, dw {ew:e}");
        }
    }
}

/// The `--set` overrides that build a fixture's model from its `args.json`: each timm keyword
/// argument under the same name in `[model.resnet]` / `[model.convnext]` (the config keys are
/// timm's argument names), plus the data shape and the timm state dict as `init.file`.
fn fixture_sets(case: &str) -> Vec<String> {
    let dir = fixture(&format!("timm_zoo/{case}"));
    let args: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("args.json")).unwrap()).unwrap();
    let kind = if case.starts_with("resnet") {
        "resnet"
    } else {
        "convnext"
    };
    let norm = if args["in_chans"] == 3 {
        "[0.5, 0.5, 0.5]"
    } else {
        "0.5"
    };
    let mut sets = vec![
        format!("model.kind=\"{kind}\""),
        format!("data.image_size={}", args["img_size"]),
        format!("data.channels={}", args["in_chans"]),
        format!("data.mean={norm}"),
        format!("data.std={norm}"),
        "data.ood=[]".into(),
        "lee.splits=[\"test\"]".into(),
        format!("model.num_classes={}", args["num_classes"]),
        "init.weights=\"file\"".into(),
        format!("init.file=\"{}\"", dir.join("model.safetensors").display()),
        "init.format=\"timm\"".into(),
    ];
    let mut named = 0;
    for (key, value) in args["kwargs"].as_object().unwrap() {
        // timm's plain 7×7 stem is 64 wide whatever `stem_width` says (it sizes deep stems).
        if ["in_chans", "num_classes", "stem_width"].contains(&key.as_str()) {
            continue;
        }
        sets.push(format!("model.{kind}.{key}={value}"));
        named += 1;
    }
    // The block type is in the model name (resnet18 / resnet50); the script records it too.
    if let Some(block) = args["class_kwargs"].get("block") {
        sets.push(format!("model.resnet.block={block}"));
    }
    assert!(named >= 2, "{case}: {:?}", args["kwargs"]);
    sets
}

fn fixture_config(case: &str) -> (Config, serde_json::Value) {
    let args = std::fs::read_to_string(fixture(&format!("timm_zoo/{case}/args.json"))).unwrap();
    (
        Config::resolve_str("", "<test>", &fixture_sets(case)).unwrap(),
        serde_json::from_str(&args).unwrap(),
    )
}

/// A copy of `vm`'s variables in `dtype`.
fn varmap_in(vm: &VarMap, dtype: DType) -> VarMap {
    let out = VarMap::new();
    {
        let src = vm.data().lock().unwrap();
        let mut dst = out.data().lock().unwrap();
        for (k, v) in src.iter() {
            dst.insert(
                k.clone(),
                Var::from_tensor(&v.as_tensor().to_dtype(dtype).unwrap()).unwrap(),
            );
        }
    }
    out
}

/// LEE of rotate / translate_x / scale per image of `x` (f64) equal to the fixture's
/// `torch.func.jvp` values `io["lee_<t>"]` within `tol` relative, and the layerwise contributions
/// summing to the end-to-end Lie derivative within 1e-10.
fn assert_lee_matches_timm(case: &str, model: &dyn Model, x: &Tensor, io: &HashMap<String, Tensor>, tol: f64) {
    let trs = [Transform::Rotate, Transform::TranslateX, Transform::Scale];
    let ours = lee_per_image(model, x, &trs, Stencil::Central, Statistic::Sq, LeeOutput::Probs).unwrap();
    for (t, tr) in trs.iter().enumerate() {
        let want: Vec<f64> = io[&format!("lee_{}", tr.name())].to_vec1().unwrap();
        for (a, b) in ours[t].iter().zip(&want) {
            let rel = (a - b).abs() / b.abs();
            println!("{case} LEE {tr}: ours {a:e} timm {b:e} rel {rel:.1e}");
            assert!(rel < tol, "{case} {tr}: ours {a:e}, timm {b:e}");
        }
        let d = decompose(model, x, *tr, Stencil::Central, LeeOutput::Probs).unwrap();
        let sum = d.contributions.sum(0).unwrap();
        let rel = norm(&(&sum - &d.end_to_end).unwrap()) / norm(&d.end_to_end);
        assert!(rel < 1e-10, "{case} {tr}: layerwise sum relative error {rel:e}");
    }
}

/// The fixture's model built from its config with the timm weights loaded, in `dtype`.
fn fixture_model(case: &str, dtype: DType) -> (Box<dyn Model>, HashMap<String, Tensor>, Vec<String>) {
    let (cfg, _) = fixture_config(case);
    let (vm, _) = build_model(&cfg, &DEV).unwrap();
    let notes = {
        let shapes = liederiv::models::parameter_shapes(&cfg).unwrap();
        let pre = load_timm(&cfg.init, &shapes).unwrap();
        pre.notes
    };
    // The loaded variables in `dtype` (f64 for the LEE oracle).
    let model = build_with(&cfg, &varmap_in(&vm, dtype), dtype, &DEV).unwrap();
    let io = candle_core::safetensors::load(fixture(&format!("timm_zoo/{case}/io.safetensors")), &DEV)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.to_dtype(dtype).unwrap()))
        .collect();
    (model, io, notes)
}

const CASES: [&str; 5] = [
    "resnet_basic_28_c1",
    "resnet_bottleneck_64_c3",
    "convnext_28_c1",
    "convnext_p2_32_c1",
    "convnext_64_c3",
];

/// Logits of random-init timm models (perturbed weights and batch-norm statistics), loaded from
/// timm's own state dicts through the config path, equal timm's to 1e-5 relative in f32.
#[test]
fn timm_resnet_and_convnext_logits() {
    for case in CASES {
        let (model, io, notes) = fixture_model(case, DType::F32);
        println!("{case}: {notes:?}");
        let logits = model.forward(&io["x"]).unwrap();
        let err = max_abs_diff(&logits, &io["logits"]) / max_abs(&io["logits"]);
        println!("{case}: logits max |ours − timm| / max |timm| = {err:.2e}");
        assert!(err < 1e-5, "{case}: logits relative error {err:e}");
    }
}

/// LEE of rotate / translate_x / scale per image against `torch.func.jvp` through timm's model in
/// f64, and the layerwise contributions summing to the end-to-end Lie derivative.
#[test]
fn timm_resnet_and_convnext_lee_f64() {
    for case in CASES {
        let (model, io, _) = fixture_model(case, DType::F64);
        let logits = model.forward(&io["x"]).unwrap();
        let err = max_abs_diff(&logits, &io["logits64"]) / max_abs(&io["logits64"]);
        assert!(err < 1e-12, "{case}: f64 logits relative error {err:e}");
        assert_lee_matches_timm(case, model.as_ref(), &io["x"], &io, 1e-12);
    }
}

/// Loading notes say what was adapted: PyTorch's batch counters dropped, a conv-MLP's 1×1 weights
/// read as linear layers; a head of another class count is dropped for a fresh one.
#[test]
fn timm_loading_notes_and_fresh_head() {
    let (_, _, notes) = fixture_model("resnet_basic_28_c1", DType::F32);
    assert!(notes.iter().any(|n| n.contains("num_batches_tracked")), "{notes:?}");
    let (_, _, notes) = fixture_model("convnext_64_c3", DType::F32);
    assert!(notes.iter().any(|n| n.contains("1×1 conv weights")), "{notes:?}");
    let (mut cfg, _) = fixture_config("resnet_basic_28_c1");
    cfg.model.num_classes = 7;
    let pre = load_timm(&cfg.init, &liederiv::models::parameter_shapes(&cfg).unwrap()).unwrap();
    assert!(!pre.tensors.contains_key("fc.weight"));
    assert!(
        pre.notes.iter().any(|n| n.contains("dropped fc.weight")),
        "{:?}",
        pre.notes
    );
    // A state dict of another architecture is refused naming what does not fit.
    let (mut cfg, _) = fixture_config("resnet_basic_28_c1");
    cfg.model.resnet.channels = vec![8, 16, 24, 40];
    let err = load_timm(&cfg.init, &liederiv::models::parameter_shapes(&cfg).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer4.0.conv1.weight"), "{err}");
}

/// Every file of a zoo's results, as bytes, by path relative to `dir` (the unit files aside).
fn results_of(dir: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    for sub in ["", "models"] {
        for e in std::fs::read_dir(dir.join(sub)).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() && !p.extension().is_some_and(|x| x == "png" || x == "svg") {
                out.insert(
                    format!("{sub}/{}", p.file_name().unwrap().to_string_lossy()),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    out
}

/// `liederiv zoo --config configs/zoo_example.toml` as is (five models, real MNIST-rot digits),
/// and the same zoo in two shards merged: the results are the same files to the byte. A shard
/// run again measures nothing; a merge with a shard missing names what is missing; a bad
/// `--shard` is refused.
#[test]
fn zoo_example_sharded_in_two_and_merged_equals_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    let base = |out: &std::path::Path| {
        vec![
            format!("zoo.out=\"{}\"", out.display()),
            "zoo.limit=40".into(), // 3 units of 16 per model: 15 units, shards of 8 and 7
            "output.progress=false".into(),
        ]
    };
    let zoo = ["zoo", "--config", "configs/zoo_example.toml"];
    let (ok, stdout, stderr) = common::liederiv(&zoo, &base(&one));
    assert!(ok, "{stderr}");
    for model in ["resnet_timm", "convnext_timm", "vit_timm", "cnn", "gcnn_c4"] {
        assert!(stdout.contains(&format!("| {model} |")), "{stdout}");
        assert!(one.join(format!("models/{model}_layerwise.png")).is_file());
    }
    assert!(one.join("error_vs_lee_rotate.png").is_file());

    // The second shard alone, then a merge that cannot happen yet.
    let shard = |k: &str| {
        let mut args = zoo.to_vec();
        args.extend(["--shard", k]);
        common::liederiv(&args, &base(&two))
    };
    let (ok, _, stderr) = shard("2/2");
    assert!(ok, "{stderr}");
    let mut merge = zoo.to_vec();
    merge.push("--merge");
    let (ok, _, stderr) = common::liederiv(&merge, &base(&two));
    assert!(
        !ok && stderr.contains("8 of 15 units have not been measured"),
        "{stderr}"
    );
    let (ok, _, stderr) = shard("1/2");
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = shard("1/2");
    assert!(
        ok && stderr.contains("measured 0 units (8 were already there)"),
        "{stderr}"
    );
    let (ok, _, stderr) = common::liederiv(&merge, &base(&two));
    assert!(ok, "{stderr}");
    let (a, b) = (results_of(&one), results_of(&two));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    assert!(a.len() >= 12, "{:?}", a.keys());
    for (name, bytes) in &a {
        assert!(bytes == &b[name], "{name} differs between one process and two shards");
    }

    for bad in ["3/2", "0/2", "2", "a/b"] {
        let (ok, _, stderr) = shard(bad);
        assert!(!ok && stderr.contains("expected K/N"), "{bad}: {stderr}");
    }

    // Units of another configuration are never merged: with fewer images every unit is
    // measured again (its fingerprint names the images), and the table counts 24.
    let mut sets = base(&one);
    sets[1] = "zoo.limit=24".into();
    let (ok, stdout, stderr) = common::liederiv(&zoo, &sets);
    assert!(
        ok && stderr.contains("measured 10 units (0 were already there)"),
        "{stderr}"
    );
    assert!(
        stdout.contains("| cnn | cnn | ") && stdout.contains(" | 24 | "),
        "{stdout}"
    );
    // A model's own overrides may not change what all models share.
    let mut sets = base(&two);
    sets.push("zoo.models=[{name = \"a\", set = [\"lee.batch_size=4\"]}]".into());
    let (ok, _, stderr) = common::liederiv(&zoo, &sets);
    assert!(!ok && stderr.contains("changes what every model shares"), "{stderr}");
}

/// `export --format timm` of a timm model loaded from its state dict writes that state dict back,
/// every tensor equal to the bit (the batch counters aside: PyTorch fills them in), in timm's
/// shapes (a conv-MLP's 1×1 convs), with timm's own `config.json` naming the architecture and its
/// arguments; timm builds each export from that file with equal logits
/// (scripts/fixtures/check_timm_zoo_export.py, its output beside it).
#[test]
fn exports_of_timm_models_are_their_state_dicts() {
    let tmp = tempfile::tempdir().unwrap();
    for case in CASES {
        let (cfg, args) = fixture_config(case);
        let out = tmp.path().join(case);
        let mut sets: Vec<String> = fixture_sets(case);
        sets.extend([
            format!("name=\"export_{case}\""),
            format!("output.dir=\"{}\"", tmp.path().display()),
        ]);
        let (ok, stdout, stderr) =
            common::liederiv(&["export", "--format", "timm", "--out", out.to_str().unwrap()], &sets);
        assert!(ok, "{case}: {stderr}");
        assert!(stdout.contains(&format!("local-dir:{}", out.display())), "{stdout}");
        let ours = candle_core::safetensors::load(out.join("model.safetensors"), &DEV).unwrap();
        let theirs =
            candle_core::safetensors::load(fixture(&format!("timm_zoo/{case}/model.safetensors")), &DEV).unwrap();
        let mut expected: Vec<&String> = theirs.keys().filter(|k| !k.ends_with("num_batches_tracked")).collect();
        expected.sort();
        let mut got: Vec<&String> = ours.keys().collect();
        got.sort();
        assert_eq!(got, expected, "{case}: keys");
        for k in expected {
            let (a, b) = (&ours[k], &theirs[k]);
            assert_eq!(a.dims(), b.dims(), "{case} {k}");
            assert_eq!(max_abs_diff(a, b), 0.0, "{case} {k}");
        }
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        // The name only supplies defaults that model_args override (timm's own fixture used
        // convnext_tiny where our export names convnext_atto): the family must agree.
        let family = |v: &serde_json::Value| {
            v.as_str()
                .unwrap()
                .split('_')
                .next()
                .unwrap()
                .trim_end_matches(char::is_numeric)
                .to_string()
        };
        assert_eq!(family(&config["architecture"]), family(&args["model"]), "{case}");
        for (key, value) in args["kwargs"].as_object().unwrap() {
            if key != "stem_width" {
                assert_eq!(&config["model_args"][key], value, "{case}: model_args.{key}");
            }
        }
        assert_eq!(
            config["pretrained_cfg"]["input_size"],
            serde_json::json!([args["in_chans"], args["img_size"], args["img_size"]])
        );
        assert_eq!(cfg.model.num_classes as u64, config["num_classes"].as_u64().unwrap());
    }
}

/// The config of a timm ViT fixture: timm's keyword arguments under our names (`embed_dim` →
/// `dim`, `num_heads` → `heads`, `global_pool` token / avg → `pool` cls / mean; the options keep
/// timm's names), DeiT's distilled class as `distilled = true`.
fn vit_fixture_config(case: &str) -> Config {
    let dir = fixture(&format!("timm_zoo/{case}"));
    let args: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("args.json")).unwrap()).unwrap();
    let norm = if args["in_chans"] == 3 {
        "[0.5, 0.5, 0.5]"
    } else {
        "0.5"
    };
    let mut sets = vec![
        "model.kind=\"vit\"".to_string(),
        format!("data.mean={norm}"),
        format!("data.std={norm}"),
        "data.ood=[]".into(),
        "lee.splits=[\"test\"]".into(),
        "init.weights=\"file\"".into(),
        format!("init.file=\"{}\"", dir.join("model.safetensors").display()),
        "init.format=\"timm\"".into(),
    ];
    if args["model"].as_str().unwrap().contains("distilled") {
        sets.push("model.vit.distilled=true".into());
    }
    for (key, value) in args["kwargs"].as_object().unwrap() {
        sets.push(match key.as_str() {
            "img_size" => format!("data.image_size={value}"),
            "in_chans" => format!("data.channels={value}"),
            "num_classes" => format!("model.num_classes={value}"),
            "embed_dim" => format!("model.vit.dim={value}"),
            "num_heads" => format!("model.vit.heads={value}"),
            "global_pool" if value == "avg" => "model.vit.pool=\"mean\"".into(),
            "global_pool" => "model.vit.pool=\"cls\"".into(),
            _ => format!("model.vit.{key}={value}"),
        });
    }
    Config::resolve_str("", "<test>", &sets).unwrap()
}

const VIT_CASES: [&str; 3] = [
    "vit_distilled_28_c1",
    "vit_ls_reg_noembed_28_c1",
    "vit_normpre_nocls_64_c3",
];

/// timm's ViT options against timm itself: DeiT's distillation token and head (the mean of the
/// two heads), layer scale with register tokens and `no_embed_class`, `norm_pre` without a class
/// token (mean pooling): logits in f32, LEE against `torch.func.jvp` in f64, the layerwise sum,
/// and the export back to timm equal to timm's state dict with the options in its arguments.
#[test]
fn timm_vit_options_logits_lee_and_export() {
    for case in VIT_CASES {
        let cfg = vit_fixture_config(case);
        let (vm, model) = build_model(&cfg, &DEV).unwrap();
        let io32 = candle_core::safetensors::load(fixture(&format!("timm_zoo/{case}/io.safetensors")), &DEV).unwrap();
        let logits = model.forward(&io32["x"]).unwrap();
        let err = max_abs_diff(&logits, &io32["logits"]) / max_abs(&io32["logits"]);
        println!("{case}: logits max |ours − timm| / max |timm| = {err:.2e}");
        assert!(err < 1e-5, "{case}: logits relative error {err:e}");

        let m64 = build_with(&cfg, &varmap_in(&vm, DType::F64), DType::F64, &DEV).unwrap();
        let x = io32["x"].to_dtype(DType::F64).unwrap();
        assert_lee_matches_timm(case, m64.as_ref(), &x, &io32, 1e-10);

        let export = liederiv::models::export::export_tensors(&cfg, &vm, liederiv::config::WeightFormat::Timm).unwrap();
        let theirs =
            candle_core::safetensors::load(fixture(&format!("timm_zoo/{case}/model.safetensors")), &DEV).unwrap();
        let mut keys: Vec<_> = export.keys().collect();
        keys.sort();
        let mut want: Vec<_> = theirs.keys().collect();
        want.sort();
        assert_eq!(keys, want, "{case}");
        for k in want {
            assert_eq!(max_abs_diff(&export[k], &theirs[k]), 0.0, "{case} {k}");
        }
        let args: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture(&format!("timm_zoo/{case}/args.json"))).unwrap())
                .unwrap();
        let (name, ours) = liederiv::models::export::timm_model(&cfg);
        assert_eq!(name, args["model"], "{case}");
        for (key, value) in args["kwargs"].as_object().unwrap() {
            assert_eq!(&ours[key], value, "{case}: timm argument {key}");
        }
    }
}

/// scripts/zoo_slurm.sh submits N shard tasks and a merge that waits for them: run with a
/// stand-in `sbatch` that runs each task at once (array tasks in turn, SLURM_ARRAY_TASK_ID set),
/// it leaves the results one process writes.
#[test]
fn slurm_example_runs_the_shards_and_merges_them() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let sbatch = bin.join("sbatch");
    std::fs::write(
        &sbatch,
        r#"#!/usr/bin/env bash
array=""; wrap=""; deps=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --array=*) array=${1#--array=};;
    --dependency=*) deps=${1#--dependency=};;
    --wrap) wrap=$2; shift;;
  esac; shift
done
echo "sbatch array=$array deps=$deps" >> "$FAKE_SLURM_LOG"
if [[ -n $array ]]; then
  for k in $(seq ${array%-*} ${array#*-}); do SLURM_ARRAY_TASK_ID=$k bash -c "$wrap" >&2 || exit 1; done
else
  bash -c "$wrap" >&2 || exit 1
fi
echo 4242
"#,
    )
    .unwrap();
    std::fs::set_permissions(&sbatch, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (one, slurm) = (tmp.path().join("one"), tmp.path().join("slurm"));
    // The zoo config with its output folder and a smaller image count (--set is not passed
    // through the script: the config is the script's input).
    let text = std::fs::read_to_string("configs/zoo_example.toml").unwrap();
    let zoo_for = |out: &std::path::Path| {
        let path = tmp
            .path()
            .join(format!("{}.toml", out.file_name().unwrap().to_string_lossy()));
        let t = text.replace("limit = 64", &format!("limit = 24\nout = \"{}\"", out.display()));
        std::fs::write(&path, t).unwrap();
        path
    };
    let (ok, _, stderr) = common::liederiv(
        &["zoo", "--config", zoo_for(&one).to_str().unwrap()],
        &["output.progress=false".into()],
    );
    assert!(ok, "{stderr}");
    let log = tmp.path().join("sbatch.log");
    let out = std::process::Command::new("bash")
        .args(["scripts/zoo_slurm.sh", zoo_for(&slurm).to_str().unwrap(), "3"])
        .env("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()))
        .env("LIEDERIV", env!("CARGO_BIN_EXE_liederiv"))
        .env("FAKE_SLURM_LOG", &log)
        .env("LOG_DIR", tmp.path().join("logs"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let calls = std::fs::read_to_string(&log).unwrap();
    assert_eq!(calls, "sbatch array=1-3 deps=\nsbatch array= deps=afterok:4242\n");
    assert_eq!(results_of(&one), results_of(&slurm));
}

/// A timm model by Hub repo name (`init.weights = "hub"`, `init.format = "timm"`), from an
/// offline cache as a download leaves it: the same logits as from the file; without the repo in
/// the cache, an error naming it and the remedy.
#[test]
fn timm_resnet_from_the_hub_cache() {
    let case = "resnet_basic_28_c1";
    let cache = common::populated_cache(
        "timm/resnet_fixture",
        &[(
            "model.safetensors",
            fixture(&format!("timm_zoo/{case}/model.safetensors")),
        )],
    );
    let mut sets = fixture_sets(case);
    sets.extend([
        "init.weights=\"hub\"".to_string(),
        "init.hub_repo=\"timm/resnet_fixture\"".into(),
        format!("init.hub_cache_dir=\"{}\"", cache.path().display()),
        "init.offline=true".into(),
    ]);
    let cfg = Config::resolve_str("", "<test>", &sets).unwrap();
    let (_, model) = build_model(&cfg, &DEV).unwrap();
    let io = candle_core::safetensors::load(fixture(&format!("timm_zoo/{case}/io.safetensors")), &DEV).unwrap();
    let logits = model.forward(&io["x"]).unwrap();
    assert!(max_abs_diff(&logits, &io["logits"]) < 1e-5 * max_abs(&io["logits"]));

    let mut cfg = cfg;
    cfg.init.hub_repo = "timm/not_cached".into();
    let err = format!("{:#}", build_model(&cfg, &DEV).err().unwrap());
    assert!(err.contains("timm/not_cached"), "{err}");
}

/// transformers' DeiT (with its teacher head) and DINOv2 (with and without registers) load from
/// their `save_pretrained` folders (init.format = "hf", config.json checked) into our ViT with
/// timm's options: DeiT's logits (the mean of its two classifiers), DINOv2's pooled output
/// (LayerNorm of the class token: our features) equal transformers' own
/// (scripts/fixtures/make_transformers_zoo_fixture.py).
#[test]
fn transformers_deit_and_dinov2_load() {
    let dx = |x: &Tensor| x.zeros_like().unwrap().unsqueeze(0).unwrap();
    for (case, extra, readout) in [
        ("deit_distilled", vec!["model.vit.distilled=true"], "logits"),
        ("dinov2", vec!["model.vit.init_values=1e-5"], "pooler_output"),
        (
            "dinov2_registers",
            vec![
                "model.vit.init_values=1e-5",
                "model.vit.reg_tokens=4",
                "model.vit.no_embed_class=true",
            ],
            "pooler_output",
        ),
    ] {
        let dir = fixture(&format!("transformers_zoo/{case}"));
        let mut sets: Vec<String> = [
            "model.kind=\"vit\"",
            "model.vit.patch_size=7",
            "model.vit.dim=32",
            "model.vit.depth=2",
            "model.vit.heads=2",
            "data.ood=[]",
            "lee.splits=[\"test\"]",
            "init.weights=\"file\"",
            "init.format=\"hf\"",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(extra.iter().map(|s| s.to_string()))
        .collect();
        sets.push(format!("init.file=\"{}\"", dir.join("model.safetensors").display()));
        let cfg = Config::resolve_str("", "<test>", &sets).unwrap();
        let (_, model) = build_model(&cfg, &DEV).unwrap();
        let io = candle_core::safetensors::load(dir.join("io.safetensors"), &DEV).unwrap();
        let x = &io["x"];
        let ours = match readout {
            "logits" => model.forward(x).unwrap(),
            _ => model.jvp_at(x, &dx(x), &mut Tape::off(), Readout::Features).unwrap().y,
        };
        let err = max_abs_diff(&ours, &io[readout]) / max_abs(&io[readout]);
        println!("{case}: {readout} max |ours − transformers| / max = {err:.2e}");
        assert!(err < 1e-5, "{case}: {readout} relative error {err:e}");

        // The config is checked against config.json: a DeiT needs its distillation token, a
        // DINOv2 its layer scale.
        let mut wrong = cfg.clone();
        wrong.model.vit.distilled = false;
        wrong.model.vit.init_values = 0.0;
        let err = format!("{:#}", build_model(&wrong, &DEV).err().unwrap());
        let want = if case == "deit_distilled" {
            "distilled"
        } else {
            "init_values"
        };
        assert!(err.contains(want), "{case}: {err}");
    }
}
