//! ViT / MAE layers and models: every JVP against f64 central finite differences of the forward,
//! the whole-ViT JVP against an autograd oracle (one backward per class), gradient reachability
//! of every trainable tensor, position-embedding interpolation, MAE masking and MAE training.

mod common;
use candle_core::{DType, Device, Result, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use common::rel_err;
use liederiv::config::{MaeConfig, VitConfig};
use liederiv::jvp::{Jvp, Tape};
use liederiv::models::layers::{
    attention, layer_norm, linear, mlp, patch_embed, DropPath, Gelu, ResidualBranch, Softmax,
};
use liederiv::models::mae::Mae;
use liederiv::models::vit::{interpolate_pos_embed, sincos_pos_embed, Vit};
use liederiv::models::{Model, Rng};
use liederiv::transforms::{image_lie_derivative, Stencil, Transform};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

const DEV: Device = Device::Cpu;

fn rng(seed: u64) -> Rng {
    Rng::seed_from_u64(seed)
}

/// Standard normal f64 tensor from the seeded RNG (never candle's global RNG).
fn randn(shape: &[usize], rng: &mut Rng) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f64> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Tensor::from_vec(data, shape, &DEV).unwrap()
}

fn vb(vm: &VarMap) -> VarBuilder<'_> {
    VarBuilder::from_varmap(vm, DType::F64, &DEV)
}

/// Check `jvp` of `f` at `x` along `dx: (T, ...)` against the f64 central difference
/// (f(x + εv) − f(x − εv)) / 2ε for every direction, and the primal against `f(x)`.
fn check_jvp(f: impl Fn(&Tensor) -> Result<Tensor>, layer: &dyn Jvp, x: &Tensor, dx: &Tensor) -> f64 {
    let (y, dy) = layer.jvp(x, dx, &mut Tape::off()).unwrap();
    assert!(rel_err(&y, &f(x).unwrap()) < 1e-14, "jvp primal differs from forward");
    let eps = 1e-5;
    let mut worst: f64 = 0.0;
    for t in 0..dx.dim(0).unwrap() {
        let v = dx.get(t).unwrap();
        let plus = f(&(x + (&v * eps).unwrap()).unwrap()).unwrap();
        let minus = f(&(x - (&v * eps).unwrap()).unwrap()).unwrap();
        let fd = ((plus - minus).unwrap() / (2.0 * eps)).unwrap();
        worst = worst.max(rel_err(&dy.get(t).unwrap(), &fd));
    }
    assert!(worst < 1e-6, "jvp vs finite differences: relative error {worst:e}");
    worst
}

#[test]
fn linear_jvp_matches_finite_differences() {
    let vm = VarMap::new();
    let l = linear(6, 5, true, vb(&vm)).unwrap();
    let mut r = rng(1);
    let x = randn(&[2, 3, 6], &mut r);
    check_jvp(|x| l.forward(x), &l, &x, &randn(&[2, 2, 3, 6], &mut r));
}

#[test]
fn layer_norm_jvp_matches_finite_differences() {
    let vm = VarMap::new();
    let ln = layer_norm(8, 1e-6, vb(&vm)).unwrap();
    // non-trivial affine parameters so the weight enters the tangent
    let mut r = rng(2);
    for var in vm.all_vars() {
        var.set(&randn(&[8], &mut r)).unwrap();
    }
    let x = randn(&[3, 4, 8], &mut r);
    check_jvp(|x| ln.forward(x), &ln, &x, &randn(&[3, 3, 4, 8], &mut r));
}

#[test]
fn gelu_jvp_matches_finite_differences_and_is_exact_erf_gelu() {
    let mut r = rng(3);
    let x = (randn(&[4, 10], &mut r) * 2.0).unwrap();
    check_jvp(|x| Gelu.forward(x), &Gelu, &x, &randn(&[2, 4, 10], &mut r));
    // PyTorch: torch.nn.functional.gelu(torch.tensor([-2., -0.5, 0., 1., 3.], dtype=torch.float64))
    let v = Tensor::new(&[-2.0f64, -0.5, 0.0, 1.0, 3.0], &DEV).unwrap();
    let expect = Tensor::new(
        &[
            -0.04550026389635842f64,
            -0.15426876936299344,
            0.0,
            0.841344746068543,
            2.99595030590511,
        ],
        &DEV,
    )
    .unwrap();
    assert!(rel_err(&Gelu.forward(&v).unwrap(), &expect) < 1e-15);
}

#[test]
fn softmax_jvp_matches_finite_differences_and_sums_to_one() {
    let mut r = rng(4);
    let x = (randn(&[2, 3, 7], &mut r) * 3.0).unwrap();
    check_jvp(|x| Softmax.forward(x), &Softmax, &x, &randn(&[3, 2, 3, 7], &mut r));
    let total = Softmax.forward(&x).unwrap().sum(D::Minus1).unwrap();
    assert!(rel_err(&total, &total.ones_like().unwrap()) < 1e-15);
}

#[test]
fn attention_jvp_matches_finite_differences() {
    let vm = VarMap::new();
    let attn = attention(12, 3, true, vb(&vm)).unwrap();
    let mut r = rng(5);
    for var in vm.all_vars() {
        let shape = var.dims().to_vec();
        var.set(&(randn(&shape, &mut r) * 0.5).unwrap()).unwrap();
    }
    let x = randn(&[2, 5, 12], &mut r);
    check_jvp(|x| attn.forward(x), &attn, &x, &randn(&[3, 2, 5, 12], &mut r));
}

#[test]
fn mlp_jvp_matches_finite_differences() {
    let vm = VarMap::new();
    let m = mlp(6, 24, vb(&vm)).unwrap();
    let mut r = rng(6);
    let x = randn(&[2, 4, 6], &mut r);
    check_jvp(|x| m.forward(x), &m, &x, &randn(&[2, 2, 4, 6], &mut r));
}

#[test]
fn patch_embed_jvp_matches_finite_differences_and_equals_strided_conv() {
    let vm = VarMap::new();
    let pe = patch_embed(2, 5, 3, true, vb(&vm)).unwrap();
    let mut r = rng(7);
    let x = randn(&[2, 2, 6, 9], &mut r);
    check_jvp(|x| pe.forward(x), &pe, &x, &randn(&[2, 2, 2, 6, 9], &mut r));
    // oracle: timm's Conv2d(kernel = stride = p), flattened to (B, h·w, D)
    let vars = vm.data().lock().unwrap();
    let (w, b) = (vars["proj.weight"].as_tensor(), vars["proj.bias"].as_tensor());
    let conv = x
        .conv2d(w, 0, 3, 1, 1)
        .unwrap()
        .broadcast_add(&b.reshape((1, 5, 1, 1)).unwrap())
        .unwrap();
    // (B, D, h, w) -> (B, h·w, D)
    let conv = conv.flatten_from(2).unwrap().transpose(1, 2).unwrap();
    assert!(rel_err(&pe.forward(&x).unwrap(), &conv) < 1e-14);
}

#[test]
fn drop_path_is_identity_in_eval_and_seeded_in_training() {
    let mut r = rng(8);
    let x = randn(&[64, 3, 4], &mut r);
    let dp = DropPath { rate: 0.25 };
    assert!(rel_err(&dp.forward(&x, None).unwrap(), &x) == 0.0);
    let a = dp.forward(&x, Some(&mut rng(9))).unwrap();
    let b = dp.forward(&x, Some(&mut rng(9))).unwrap();
    assert_eq!(rel_err(&a, &b), 0.0, "same seed, same mask");
    // each sample is either dropped (all zero) or scaled by exactly 1/(1 − rate)
    let (a, x) = (a.to_vec3::<f64>().unwrap(), x.to_vec3::<f64>().unwrap());
    let mut dropped = 0;
    for (sa, sx) in a.iter().zip(&x) {
        let flat_a: Vec<f64> = sa.concat();
        let flat_x: Vec<f64> = sx.concat();
        if flat_a.iter().all(|v| *v == 0.0) {
            dropped += 1;
        } else {
            flat_a
                .iter()
                .zip(&flat_x)
                .for_each(|(p, q)| assert!((p - q / 0.75).abs() < 1e-12));
        }
    }
    assert!((4..=30).contains(&dropped), "{dropped} of 64 dropped at rate 0.25");
}

/// A small ViT for exact tests: 8×8 images of 2 channels, 4×4 patches (2×2 grid), width 16.
fn small_cfg(pool: &str, pos: &str) -> VitConfig {
    VitConfig {
        patch_size: 4,
        dim: 16,
        depth: 2,
        heads: 2,
        mlp_ratio: 2.0,
        pool: serde_json::from_value(serde_json::json!(pool)).unwrap(),
        pos_embed: serde_json::from_value(serde_json::json!(pos)).unwrap(),
        ..VitConfig::default()
    }
}

/// Give every variable non-trivial random values (zero biases would hide bugs).
fn randomize(vm: &VarMap, seed: u64) {
    let mut r = rng(seed);
    let mut vars = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect::<Vec<_>>();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, var) in vars {
        let shape = var.dims().to_vec();
        var.set(&(randn(&shape, &mut r) * 0.3).unwrap()).unwrap();
    }
}

#[test]
fn vit_jvp_matches_finite_differences_for_both_pools_and_pos_embeds() {
    for (i, (pool, pos)) in [
        ("cls", "learned"),
        ("cls", "sincos"),
        ("mean", "learned"),
        ("mean", "sincos"),
    ]
    .into_iter()
    .enumerate()
    {
        let vm = VarMap::new();
        let vit = Vit::new(&small_cfg(pool, pos), 8, 2, 5, vb(&vm)).unwrap();
        randomize(&vm, 10 + i as u64);
        let mut r = rng(20 + i as u64);
        let x = randn(&[3, 2, 8, 8], &mut r);
        let err = check_jvp(|x| vit.forward(x), &vit, &x, &randn(&[2, 3, 2, 8, 8], &mut r));
        eprintln!("vit pool={pool} pos={pos}: jvp vs FD relative error {err:e}");
    }
}

#[test]
fn vit_jvp_matches_autograd_oracle() {
    // Independent oracle: row k of the Jacobian from one backward of logit k, then J·v.
    for pool in ["cls", "mean"] {
        let vm = VarMap::new();
        let vit = Vit::new(&small_cfg(pool, "learned"), 8, 2, 5, vb(&vm)).unwrap();
        randomize(&vm, 30);
        let mut r = rng(31);
        let x = Var::from_tensor(&randn(&[3, 2, 8, 8], &mut r)).unwrap();
        let v = randn(&[1, 3, 2, 8, 8], &mut r);
        let (_, dy) = vit.jvp(x.as_tensor(), &v, &mut Tape::off()).unwrap();
        let logits = vit.forward(x.as_tensor()).unwrap();
        let mut cols = Vec::new();
        for k in 0..5 {
            let grads = logits.narrow(1, k, 1).unwrap().sum_all().unwrap().backward().unwrap();
            let g = grads.get(x.as_tensor()).unwrap(); // (B, C, H, W): row k for every sample
            cols.push(
                (g * v.get(0).unwrap())
                    .unwrap()
                    .flatten_from(1)
                    .unwrap()
                    .sum_keepdim(1)
                    .unwrap(),
            );
        }
        let oracle = Tensor::cat(&cols, 1).unwrap(); // (B, K)
        let err = rel_err(&dy.get(0).unwrap(), &oracle);
        eprintln!("vit pool={pool}: jvp vs autograd relative error {err:e}");
        assert!(err < 1e-10, "pool={pool}: {err:e}");
    }
}

#[test]
fn vit_layerwise_steps_sum_to_the_end_to_end_lie_derivative() {
    // Paper Eq. 6: every operation is a tape step, so the per-step contributions telescope.
    for (pool, tail) in [("cls", ["norm", "pool", "head"]), ("mean", ["pool", "fc_norm", "head"])] {
        let vm = VarMap::new();
        let vit = Vit::new(&small_cfg(pool, "learned"), 8, 2, 5, vb(&vm)).unwrap();
        randomize(&vm, 35);
        let x = randn(&[3, 2, 8, 8], &mut rng(36));
        let lx = image_lie_derivative(&x, Transform::Rotate, Stencil::Central)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let (_, end_to_end) = vit.jvp(&x, &lx, &mut Tape::off()).unwrap();
        let mut tape = Tape::layerwise(Transform::Rotate, Stencil::Central);
        let (_, channels) = vit.jvp(&x, &lx, &mut tape).unwrap();
        let names: Vec<&str> = tape.steps().iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names.len(), 3 + 8 * 2 + 3, "{names:?}");
        assert_eq!(&names[..4], ["patch_embed", "cls_token", "pos_embed", "blocks.0.norm1"]);
        assert_eq!(names[names.len() - 3..], tail);
        assert_eq!(channels.dim(0).unwrap(), 1 + names.len());
        assert_eq!(
            channels
                .get(0)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap(),
            0.0
        );
        let total = channels.narrow(0, 1, names.len()).unwrap().sum(0).unwrap();
        let err = rel_err(&total, &end_to_end.get(0).unwrap());
        assert!(
            err < 1e-12,
            "pool={pool}: steps sum to the end-to-end Lie derivative up to {err:e}"
        );
    }
}

/// Every trainable tensor must receive a non-zero gradient (candle's fused ops cut it silently).
fn assert_all_grads_nonzero(vm: &VarMap, loss: &Tensor) {
    let grads = loss.backward().unwrap();
    let vars = vm.data().lock().unwrap();
    assert!(!vars.is_empty());
    for (name, var) in vars.iter() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let norm = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(norm > 0.0, "{name}: zero gradient");
    }
}

#[test]
fn every_vit_parameter_gets_a_gradient() {
    for pool in ["cls", "mean"] {
        let vm = VarMap::new();
        let cfg = VitConfig {
            drop_path: 0.1,
            ..small_cfg(pool, "learned")
        };
        let vit = Vit::new(&cfg, 8, 2, 5, vb(&vm)).unwrap();
        let names: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
        let expected = if pool == "cls" { "norm.weight" } else { "fc_norm.weight" };
        assert!(
            names.iter().any(|n| n == expected),
            "{pool}: {expected} missing from {names:?}"
        );
        // cls_token, pos_embed + patch_embed(2) + norm(2) + head(2) + 12 per block
        assert_eq!(names.len(), 2 + 2 + 2 + 2 + 12 * 2, "{names:?}");
        let x = randn(&[4, 2, 8, 8], &mut rng(40));
        // drop path off for the reachability check: a dropped branch legitimately gets no gradient
        let logits = vit.forward(&x).unwrap();
        assert_all_grads_nonzero(&vm, &logits.sqr().unwrap().sum_all().unwrap());
        // the training forward with drop path is seeded
        let a = vit.forward_train(&x, &mut rng(41)).unwrap();
        let b = vit.forward_train(&x, &mut rng(41)).unwrap();
        assert_eq!(rel_err(&a, &b), 0.0);
    }
}

fn mae_cfg() -> (VitConfig, MaeConfig) {
    let vit = VitConfig {
        depth: 2,
        ..VitConfig::tiny_mnist()
    };
    let mae = MaeConfig {
        decoder_dim: 32,
        decoder_depth: 1,
        decoder_heads: 2,
        ..MaeConfig::default()
    };
    (vit, mae)
}

#[test]
fn every_mae_parameter_gets_a_gradient_and_the_encoder_is_the_vit() {
    let (vit_cfg, mae_cfg) = mae_cfg();
    let vm = VarMap::new();
    let mae = Mae::new(&vit_cfg, &mae_cfg, 28, 1, vb(&vm)).unwrap();
    let x = randn(&[4, 1, 28, 28], &mut rng(50));
    assert_all_grads_nonzero(&vm, &mae.loss(&x, &mut rng(51)).unwrap());
    // a ViT on the same VarMap reuses every encoder tensor and adds only its head
    let before: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
    Vit::new(&vit_cfg, 28, 1, 10, vb(&vm)).unwrap();
    let mut added: Vec<String> = vm
        .data()
        .lock()
        .unwrap()
        .keys()
        .filter(|k| !before.contains(k))
        .cloned()
        .collect();
    added.sort();
    assert_eq!(added, ["head.bias", "head.weight"]);
}

#[test]
fn mae_masking_keeps_the_requested_ratio() {
    let (vit_cfg, mut mae_cfg) = mae_cfg();
    for (ratio, keep) in [(0.75, 4), (0.5, 8), (0.4, 10)] {
        mae_cfg.mask_ratio = ratio;
        let vm = VarMap::new();
        let mae = Mae::new(&vit_cfg, &mae_cfg, 28, 1, vb(&vm)).unwrap();
        let m = mae.random_masking(32, &mut rng(60));
        let mut distinct = std::collections::HashSet::new();
        for b in 0..32 {
            assert_eq!(m.keep[b].len(), keep);
            assert_eq!(m.mask[b].iter().sum::<f64>(), (16 - keep) as f64);
            for &k in &m.keep[b] {
                assert_eq!(m.mask[b][k], 0.0, "a kept patch is masked");
            }
            distinct.insert(m.keep[b].clone());
        }
        assert!(distinct.len() > 16, "masks should differ between samples");
        let again = mae.random_masking(32, &mut rng(60));
        assert_eq!(m.keep, again.keep, "same seed, same masks");
    }
}

#[test]
fn mae_patchify_round_trips_and_uses_mae_pixel_order() {
    let vm = VarMap::new();
    let vit = VitConfig {
        patch_size: 2,
        dim: 8,
        depth: 1,
        heads: 2,
        ..VitConfig::default()
    };
    let mae = Mae::new(
        &vit,
        &MaeConfig {
            decoder_dim: 8,
            ..MaeConfig::default()
        },
        4,
        3,
        vb(&vm),
    )
    .unwrap();
    let x = randn(&[2, 3, 4, 4], &mut rng(70));
    let p = mae.patchify(&x).unwrap();
    assert_eq!(p.dims(), &[2, 4, 12]);
    assert_eq!(rel_err(&mae.unpatchify(&p).unwrap(), &x), 0.0);
    // MAE's 'nchpwq->nhwpqc': patch (hi, wi), element ((pi·p + qi)·C + c) = x[b, c, hi·p + pi, wi·p + qi]
    let (pv, xv) = (
        p.to_vec3::<f64>().unwrap(),
        x.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
    );
    for b in 0..2 {
        for (hi, wi, pi, qi, c) in (0..16 * 3).map(|k| (k / 24, (k / 12) % 2, (k / 6) % 2, (k / 3) % 2, k % 3)) {
            let want = xv[((b * 3 + c) * 4 + hi * 2 + pi) * 4 + wi * 2 + qi];
            assert_eq!(pv[b][hi * 2 + wi][(pi * 2 + qi) * 3 + c], want);
        }
    }
}

#[test]
fn sincos_pos_embed_matches_mae() {
    // From MAE util/pos_embed.py: get_2d_sincos_pos_embed(8, 2, cls_token=True)[2] is token (0, 1);
    // its first half encodes the column, its second half the row.
    let pe = sincos_pos_embed(8, 2, 2, DType::F64, &DEV).unwrap().get(0).unwrap();
    let pe: Vec<Vec<f64>> = pe.to_vec2().unwrap();
    assert!(pe[0].iter().all(|v| *v == 0.0));
    let s1 = 1f64.sin();
    let s2 = (0.01f64).sin();
    let c1 = 1f64.cos();
    let c2 = (0.01f64).cos();
    // token (0, 1): column 1, row 0
    let want = [s1, s2, c1, c2, 0.0, 0.0, 1.0, 1.0];
    pe[2]
        .iter()
        .zip(want)
        .for_each(|(a, b)| assert!((a - b).abs() < 1e-15, "{:?}", pe[2]));
}

#[test]
fn pos_embed_interpolation_is_identity_on_same_grid_and_runs_at_56px() {
    let cfg = VitConfig::tiny_mnist();
    let vm28 = VarMap::new();
    let vit28 = Vit::new(&cfg, 28, 1, 10, vb(&vm28)).unwrap();
    let pos = vm28.data().lock().unwrap()["pos_embed"].as_tensor().clone();
    assert_eq!(
        rel_err(&interpolate_pos_embed(&pos, (4, 4), (4, 4)).unwrap(), &pos),
        0.0
    );

    let vm56 = VarMap::new();
    let vit56 = Vit::new(&cfg, 56, 1, 10, vb(&vm56)).unwrap();
    assert_eq!(vit56.grid(), (8, 8));
    for (name, var) in vm56.data().lock().unwrap().iter() {
        let src = vm28.data().lock().unwrap()[name].as_tensor().clone();
        let value = if name == "pos_embed" {
            interpolate_pos_embed(&src, (4, 4), (8, 8)).unwrap()
        } else {
            src
        };
        var.set(&value).unwrap();
    }
    let x28 = randn(&[2, 1, 28, 28], &mut rng(80));
    let x56 = x28.upsample_nearest2d(56, 56).unwrap();
    let l56 = vit56.forward(&x56).unwrap();
    assert_eq!(l56.dims(), &[2, 10]);
    let finite = l56
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
        .iter()
        .all(|v| v.is_finite());
    assert!(finite);
    assert!(vit28.forward(&x28).unwrap().dims() == [2, 10]);
}

/// Expected values from PyTorch (the resampling of MAE's / timm's `interpolate_pos_embed`):
/// ```python
/// import torch, torch.nn.functional as F
/// D, old = 2, 3
/// i = torch.arange(1 + old * old, dtype=torch.float64)[:, None]
/// d = torch.arange(D, dtype=torch.float64)[None, :]
/// pos = torch.sin(0.7 * i + 1.3 * d)[None]  # (1, 1+9, 2)
/// for new in (5, 2):
///     tok = pos[:, 1:].reshape(-1, old, old, D).permute(0, 3, 1, 2)
///     tok = F.interpolate(tok, size=(new, new), mode="bicubic", align_corners=False)
///     tok = tok.permute(0, 2, 3, 1).flatten(1, 2)
///     out = torch.cat((pos[:, :1], tok), dim=1)
///     print(new, [round(v, 15) for v in out[0, 1:].flatten().tolist()])
/// ```
#[test]
fn interpolate_pos_embed_matches_pytorch_bicubic() {
    let (d, old) = (2usize, 3usize);
    let data: Vec<f64> = (0..1 + old * old)
        .flat_map(|i| (0..d).map(move |k| (0.7 * i as f64 + 1.3 * k as f64).sin()))
        .collect();
    let pos = Tensor::from_vec(data, (1, 1 + old * old, d), &DEV).unwrap();
    let up: [f64; 50] = [
        0.631680583169252,
        1.124210607865876,
        0.850602092277932,
        0.932735518725113,
        1.113728093925555,
        0.564040151184518,
        1.094000084043641,
        0.052095259548745,
        1.021686722021908,
        -0.286873784030761,
        0.631755358297586,
        0.226806612333225,
        0.593907448767315,
        0.043886756511535,
        0.48718614794252,
        -0.238326896397333,
        0.25673396786743,
        -0.460012563104682,
        0.091489078960928,
        -0.580611010911475,
        0.400822202429075,
        -0.801199911278352,
        0.106405918771968,
        -0.908222408594837,
        -0.35078322768962,
        -0.996164608835841,
        -0.718883804265565,
        -0.831110447316929,
        -0.921571856707089,
        -0.67764039437691,
        -0.481540741798966,
        -0.527069264157511,
        -0.554030106183372,
        -0.38425782372223,
        -0.618647847674254,
        -0.135001935635745,
        -0.526147324488881,
        0.148540453138919,
        -0.436863068206623,
        0.326654290579066,
        -1.152197378388967,
        -0.08375424686197,
        -0.988783229689836,
        0.246702682561068,
        -0.658193045249861,
        0.729601784217708,
        -0.160441284995126,
        1.027203601365978,
        0.175087375098464,
        1.166872956369289,
    ];
    let down: [f64; 8] = [
        0.645725106552624,
        0.408159689628166,
        0.498937454213589,
        -0.32634585498817,
        -0.689664808342114,
        -0.21528733930996,
        -0.326290162873774,
        0.498981132965265,
    ];
    for (new, want) in [(5usize, &up[..]), (2, &down[..])] {
        let got = interpolate_pos_embed(&pos, (old, old), (new, new)).unwrap();
        assert_eq!(got.dims(), &[1, 1 + new * new, d]);
        let got = got.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert_eq!(got[..d], [0.0f64.sin(), 1.3f64.sin()], "cls slot must be untouched");
        for (g, w) in got[d..].iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{new}×{new}: {g} vs PyTorch {w}");
        }
    }
}

/// The first `n` MNIST training images as `(n, 1, 28, 28)` f32 in [0, 1], found as the CLI finds
/// them (`$LIEDERIV_DATA_DIR`, else the Hub cache; neither is an error, not a skip).
fn mnist_images(n: usize) -> Tensor {
    let pool = liederiv::data::mnist_pool(&liederiv::Config::default())
        .unwrap_or_else(|e| panic!("MNIST (set LIEDERIV_DATA_DIR or fill the Hub cache): {e}"));
    let pixels: Vec<f32> = pool.images[..n * 784].iter().map(|&b| b as f32 / 255.0).collect();
    Tensor::from_vec(pixels, (n, 1, 28, 28), &DEV).unwrap()
}

#[test]
fn mae_loss_decreases_on_mnist() {
    let imgs = mnist_images(256);
    let (vit_cfg, mae_cfg) = mae_cfg();
    let vm = VarMap::new();
    let mae = Mae::new(
        &vit_cfg,
        &mae_cfg,
        28,
        1,
        VarBuilder::from_varmap(&vm, DType::F32, &DEV),
    )
    .unwrap();
    let mut opt = AdamW::new(
        vm.all_vars(),
        ParamsAdamW {
            lr: 2e-3,
            weight_decay: 0.05,
            ..Default::default()
        },
    )
    .unwrap();
    let mut r = rng(90);
    let mut losses = Vec::new();
    for step in 0..30 {
        let batch = imgs.narrow(0, (step * 32) % 256, 32).unwrap();
        let loss = mae.loss(&batch, &mut r).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        opt.backward_step(&loss).unwrap();
    }
    let first = losses[..5].iter().sum::<f32>() / 5.0;
    let last = losses[25..].iter().sum::<f32>() / 5.0;
    eprintln!("MAE loss: first 5 steps {first:.4}, last 5 steps {last:.4}");
    assert!(
        last.is_finite() && last < 0.8 * first,
        "MAE loss did not decrease: {losses:?}"
    );
}

/// Timings for the report: `cargo test --release --test vit timing -- --ignored --nocapture`.
#[test]
#[ignore]
fn timing_tiny_and_small_vit() {
    use std::time::Instant;
    for (label, cfg) in [
        ("tiny p7/64/4/2", VitConfig::tiny_mnist()),
        ("small p4/192/6/3", VitConfig::small_mnist()),
    ] {
        let vm = VarMap::new();
        let vit = Vit::new(&cfg, 28, 1, 10, VarBuilder::from_varmap(&vm, DType::F32, &DEV)).unwrap();
        let params: usize = vm.all_vars().iter().map(|v| v.elem_count()).sum();
        let x = randn(&[128, 1, 28, 28], &mut rng(100)).to_dtype(DType::F32).unwrap();
        let dx = randn(&[1, 128, 1, 28, 28], &mut rng(101)).to_dtype(DType::F32).unwrap();
        // one warm-up call, then the mean of 3
        let time = |f: &dyn Fn()| {
            f();
            let reps = 3;
            let t = Instant::now();
            for _ in 0..reps {
                f();
            }
            t.elapsed().as_secs_f64() * 1e3 / reps as f64
        };
        let fwd = time(&|| {
            vit.forward(&x).unwrap();
        });
        let fwd_bwd = time(&|| {
            vit.forward(&x)
                .unwrap()
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap()
                .backward()
                .unwrap();
        });
        let jvp = time(&|| {
            vit.jvp(&x, &dx, &mut Tape::off()).unwrap();
        });
        eprintln!("{label}: {params} params; batch 128: forward {fwd:.1} ms, forward+backward {fwd_bwd:.1} ms, jvp (T=1) {jvp:.1} ms");
    }
}

#[test]
fn vit_rejects_an_image_of_another_size_with_a_clear_error() {
    let vm = VarMap::new();
    let vit = Vit::new(&VitConfig::tiny_mnist(), 28, 1, 10, vb(&vm)).unwrap();
    let err = vit
        .forward(&randn(&[1, 1, 56, 56], &mut rng(81)))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("4×4 token grid") && err.contains("interpolate_pos_embed"),
        "{err}"
    );
}
