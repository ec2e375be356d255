//! The convolutional layers, the CNN baseline and the C_N G-CNN against independent oracles:
//! every jvp against an f64 central finite difference of the forward, a non-zero gradient for
//! every trainable tensor, exact C4 invariance under index rotations of the input, and C8's
//! approximate invariance under 45° rotations compared with the CNN's.

mod common;
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::rel_err;
use liederiv::config::{CnnConfig, GcnnConfig};
use liederiv::jvp::{Jvp, Tape};
use liederiv::models::cnn::Cnn;
use liederiv::models::conv::{
    AvgPool2d, BatchNorm, Conv2d, ConvSpec, DepthwiseConv2d, Elu, GlobalAvgPool, Layer, Linear, MaxPool2d, PadMode,
    Relu,
};
use liederiv::models::gcnn::{rot90, Gcnn, GroupConv, GroupMaxPool};
use liederiv::models::{Model, Rng};
use liederiv::transforms::{apply, image_lie_derivative, Padding, Stencil, Transform};
use rand::SeedableRng;

const DEV: Device = Device::Cpu;

/// A deterministic pseudo-random tensor in [-1, 1) (splitmix-style hash of the index).
fn noise(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n as u64)
        .map(|i| {
            let mut z = (i + 1).wrapping_mul(0x9E3779B97F4A7C15) ^ seed.wrapping_mul(0xBF58476D1CE4E5B9);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &DEV).unwrap().to_dtype(dtype).unwrap()
}

/// Smooth "digit-like" images: a few Gaussian strokes inside the central disk, `(B, 1, S, S)`.
fn blobs(b: usize, s: usize, seed: u64, dtype: DType) -> Tensor {
    let params = noise(&[b, 4, 3], seed, DType::F64).to_vec3::<f64>().unwrap();
    let c = (s as f64 - 1.0) / 2.0;
    let mut v = Vec::with_capacity(b * s * s);
    for img in &params {
        for i in 0..s {
            for j in 0..s {
                let mut acc = 0.0;
                for p in img {
                    let (cy, cx) = (c + 0.3 * c * p[0], c + 0.3 * c * p[1]);
                    let r2 = (i as f64 - cy).powi(2) + (j as f64 - cx).powi(2);
                    acc += (-r2 / (2.0 * (1.5 + p[2]).powi(2) * (s as f64 / 28.0).powi(2))).exp();
                }
                v.push(acc);
            }
        }
    }
    Tensor::from_vec(v, (b, 1, s, s), &DEV)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn vb(map: &VarMap, dtype: DType) -> VarBuilder<'static> {
    liederiv::models::init::SeededVarMap::var_builder(map, 0, dtype, &DEV)
}

/// jvp with T = 2 tangents against the f64 central difference (f(x+hv) − f(x−hv)) / 2h of the
/// eval-mode forward, per tangent. Returns the worst relative error.
fn fd_check(f: &dyn Fn(&Tensor) -> Result<Tensor>, jvp: &dyn Jvp, x: &Tensor) -> f64 {
    let mut shape = vec![2];
    shape.extend_from_slice(x.dims());
    let dx = noise(&shape, 99, DType::F64);
    let (y, dy) = jvp.jvp(x, &dx, &mut Tape::off()).unwrap();
    let y0 = f(x).unwrap();
    assert!(rel_err(&y, &y0) < 1e-12, "jvp primal differs from forward");
    let h = 1e-6;
    let mut worst = 0.0f64;
    for t in 0..2 {
        let v = dx.get(t).unwrap();
        let plus = f(&(x + (&v * h).unwrap()).unwrap()).unwrap();
        let minus = f(&(x - (&v * h).unwrap()).unwrap()).unwrap();
        let fd = ((plus - minus).unwrap() / (2.0 * h)).unwrap();
        let e = rel_err(&dy.get(t).unwrap(), &fd);
        assert!(
            fd.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap() > 1e-12,
            "degenerate FD"
        );
        worst = worst.max(e);
    }
    worst
}

fn check_layer<L: Layer + Jvp>(name: &str, layer: &L, x: &Tensor) {
    let e = fd_check(&|x| layer.forward_t(x, false), layer, x);
    println!("{name}: jvp vs FD rel err {e:.2e}");
    assert!(e < 1e-6, "{name}: jvp vs f64 FD relative error {e:.3e}");
}

#[test]
fn conv_layers_jvp_match_finite_differences() {
    let map = VarMap::new();
    let vb = vb(&map, DType::F64);
    let x = noise(&[2, 3, 8, 8], 1, DType::F64);
    for (i, (stride, pad_mode, k)) in [
        (1, PadMode::Zeros, 3),
        (2, PadMode::Zeros, 3),
        (1, PadMode::Circular, 3),
        (2, PadMode::Circular, 5),
    ]
    .into_iter()
    .enumerate()
    {
        let spec = ConvSpec {
            stride,
            padding: k / 2,
            pad_mode,
        };
        let conv = Conv2d::load(3, 4, k, spec, true, vb.pp(format!("conv{i}"))).unwrap();
        check_layer(&format!("conv {spec:?}"), &conv, &x);
    }
    check_layer("relu", &Relu, &x);
    check_layer("elu", &Elu { alpha: 1.0 }, &x);
    check_layer("elu(0.5)", &Elu { alpha: 0.5 }, &x);
    check_layer("avg pool", &AvgPool2d { k: 2 }, &x);
    check_layer("max pool", &MaxPool2d::new(2), &x);
    let stem_pool = MaxPool2d {
        k: 3,
        stride: 2,
        pad: 1,
    };
    check_layer("max pool 3×3 stride 2 padding 1", &stem_pool, &x);
    check_layer(
        "max pool 3×3 stride 2 padding 1, odd side",
        &stem_pool,
        &noise(&[2, 3, 7, 7], 4, DType::F64),
    );
    for k in [3, 7] {
        let dw = DepthwiseConv2d::load(3, k, vb.pp(format!("dw{k}"))).unwrap();
        check_layer(&format!("depthwise conv {k}×{k}"), &dw, &x);
    }
    check_layer("global avg pool", &GlobalAvgPool, &x);
    let lin = Linear::load(5, 3, vb.pp("lin")).unwrap();
    check_layer("linear", &lin, &noise(&[4, 5], 2, DType::F64));

    // Batch norm in eval mode, with running statistics made non-trivial by train-mode passes.
    for (i, shape) in [vec![4, 3, 5, 5], vec![4, 3, 4, 5, 5]].into_iter().enumerate() {
        let bn = BatchNorm::load(3, vb.pp(format!("bn{i}"))).unwrap();
        for s in 0..3 {
            let xt = ((noise(&shape, 10 + s, DType::F64) * 2.0).unwrap() + 0.7).unwrap();
            bn.forward_t(&xt, true).unwrap();
        }
        check_layer(&format!("batch norm {shape:?}"), &bn, &noise(&shape, 3, DType::F64));
    }
}

#[test]
fn max_pool_jvp_takes_the_argmax_tangent() {
    // One 2×2 window with its max at (1, 0): the tangent there is the output tangent.
    let x = Tensor::new(&[[[[0.1f64, 0.2], [0.9, 0.3]]]], &DEV).unwrap();
    let dx = Tensor::new(&[1.0f64, 2.0, 3.0, 4.0], &DEV)
        .unwrap()
        .reshape((1, 1, 1, 2, 2))
        .unwrap();
    let (y, dy) = MaxPool2d::new(2).jvp(&x, &dx, &mut Tape::off()).unwrap();
    assert_eq!(y.flatten_all().unwrap().to_vec1::<f64>().unwrap(), vec![0.9]);
    assert_eq!(dy.flatten_all().unwrap().to_vec1::<f64>().unwrap(), vec![3.0]);
}

/// The padded stem pool (3×3, stride 2, padding 1) against a direct loop over its windows, with
/// −∞ padding and ties broken by the first maximum in row-major window order (PyTorch's rule):
/// an all-zero window (ReLU output) takes the tangent of its first element.
#[test]
fn padded_max_pool_matches_a_direct_loop_and_breaks_ties_first() {
    let pool = MaxPool2d {
        k: 3,
        stride: 2,
        pad: 1,
    };
    let (h, w) = (7usize, 6usize);
    let mut xv = noise(&[1, 1, h, w], 8, DType::F64)
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    // Output (2, 2)'s window, rows and columns 3..6, all negative: zeros after the ReLU, a tie.
    for i in 3..6 {
        for j in 3..6 {
            xv[i * w + j] = -1.0;
        }
    }
    let x = Tensor::from_vec(xv.clone(), (1, 1, h, w), &DEV)
        .unwrap()
        .relu()
        .unwrap();
    let xr = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let dxv: Vec<f64> = (0..h * w).map(|i| i as f64 + 1.0).collect();
    let dx = Tensor::from_vec(dxv.clone(), (1, 1, 1, h, w), &DEV).unwrap();
    let (y, dy) = pool.jvp(&x, &dx, &mut Tape::off()).unwrap();
    let (oh, ow) = ((h + 2 - 3) / 2 + 1, (w + 2 - 3) / 2 + 1);
    assert_eq!(y.dims(), &[1, 1, oh, ow]);
    let (yv, dyv) = (
        y.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
        dy.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
    );
    for oy in 0..oh {
        for ox in 0..ow {
            let mut best: Option<(f64, usize)> = None;
            for i in 0..3 {
                for j in 0..3 {
                    let (iy, ix) = ((oy * 2 + i) as i64 - 1, (ox * 2 + j) as i64 - 1);
                    if iy < 0 || ix < 0 || iy >= h as i64 || ix >= w as i64 {
                        continue;
                    }
                    let idx = iy as usize * w + ix as usize;
                    if best.is_none_or(|(b, _)| xr[idx] > b) {
                        best = Some((xr[idx], idx));
                    }
                }
            }
            let (v, idx) = best.unwrap();
            assert_eq!(yv[oy * ow + ox], v, "value at ({oy}, {ox})");
            assert_eq!(dyv[oy * ow + ox], dxv[idx], "tangent at ({oy}, {ox})");
        }
    }
    // The all-zero window exists and took its first element.
    assert!(yv.contains(&0.0));
}

#[test]
fn batch_norm_train_normalises_and_updates_running_stats() {
    let map = VarMap::new();
    let bn = BatchNorm::load(2, vb(&map, DType::F64).pp("bn")).unwrap();
    let x = ((noise(&[8, 2, 3, 3], 5, DType::F64) * 3.0).unwrap() + 2.0).unwrap();
    let y = bn.forward_t(&x, true).unwrap();
    // Batch statistics: each channel has mean 0 and (biased) variance 1 − ε-ish.
    let m = y.mean((0, 2, 3)).unwrap().to_vec1::<f64>().unwrap();
    let v = y.sqr().unwrap().mean((0, 2, 3)).unwrap().to_vec1::<f64>().unwrap();
    for c in 0..2 {
        assert!(
            m[c].abs() < 1e-12 && (v[c] - 1.0).abs() < 1e-3,
            "channel {c}: mean {} var {}",
            m[c],
            v[c]
        );
    }
    // running_mean = 0.9·0 + 0.1·batch mean.
    let data = map.data().lock().unwrap();
    let rm = data["bn.running_mean"].as_tensor().to_vec1::<f64>().unwrap();
    let bm = x.mean((0, 2, 3)).unwrap().to_vec1::<f64>().unwrap();
    for c in 0..2 {
        assert!(
            (rm[c] - 0.1 * bm[c]).abs() < 1e-12,
            "running mean {} vs {}",
            rm[c],
            0.1 * bm[c]
        );
    }
}

#[test]
fn rot90_is_the_warps_quarter_turn() {
    let w = noise(&[2, 3, 5, 5], 7, DType::F64);
    let warped = apply(
        &w.reshape((6, 1, 5, 5)).unwrap(),
        Transform::Rotate,
        &[std::f64::consts::FRAC_PI_2],
        Padding::Zeros,
    )
    .unwrap()
    .reshape((2, 3, 5, 5))
    .unwrap();
    let e = rel_err(&rot90(&w).unwrap(), &warped);
    assert!(e < 1e-12, "rot90 vs warp(π/2): {e:.3e}");
}

/// The filter bank (one matmul with the tabulated rotations and a gather) against its definition
/// composed op by op: for output orientation r, the base filter rolled by r along the input
/// orientations (group convs), disk-masked, bilinearly rotated by the remainder of 2πr/N past a
/// quarter turn, masked again, then turned by rot90 that many quarter turns.
#[test]
fn filter_bank_is_every_rotation_of_the_base_filter() {
    let map = VarMap::new();
    let vb = vb(&map, DType::F64);
    let k = 5;
    let c = (k as f64 - 1.0) / 2.0;
    let disk: Vec<f64> = (0..k * k)
        .map(|p| {
            let (i, j) = ((p / k) as f64 - c, (p % k) as f64 - c);
            f64::from(i * i + j * j <= (k as f64 / 2.0).powi(2))
        })
        .collect();
    let disk = Tensor::from_vec(disk, (k, k), &DEV).unwrap();
    for n in [4, 8, 16] {
        for lifting in [true, false] {
            let name = format!("c{n}_{}", if lifting { "lift" } else { "group" });
            let conv = GroupConv::load(2, 3, n, k, lifting, vb.pp(&name)).unwrap();
            let w = map.data().lock().unwrap()[&format!("{name}.weight")]
                .as_tensor()
                .clone();
            let bank = conv.bank().unwrap(); // (3·N, 2·[N], k, k), rows (field, r)
            let mask = |t: &Tensor| {
                if n == 4 {
                    t.clone()
                } else {
                    t.broadcast_mul(&disk).unwrap()
                }
            };
            for r in 0..n {
                let mut f = if lifting {
                    w.clone()
                } else {
                    w.roll(r as i32, 2).unwrap()
                };
                f = mask(&f);
                let (q, m) = (r / (n / 4), r % (n / 4));
                if m != 0 {
                    let dims = f.dims().to_vec();
                    let angle = 2.0 * std::f64::consts::PI * m as f64 / n as f64;
                    let flat = f.reshape(((), 1, k, k)).unwrap();
                    f = mask(
                        &apply(&flat, Transform::Rotate, &[angle], Padding::Zeros)
                            .unwrap()
                            .reshape(dims)
                            .unwrap(),
                    );
                }
                for _ in 0..q {
                    f = rot90(&f).unwrap();
                }
                let expected = f.reshape((3, 1, (), k, k)).unwrap();
                let got = bank.reshape((3, n, (), k, k)).unwrap().narrow(1, r, 1).unwrap();
                let e = rel_err(&got, &expected);
                assert!(e < 1e-12, "{name}, r = {r}: bank vs composed rotation {e:.3e}");
            }
            // The test can fail: different orientations hold different filters.
            let b = bank.reshape((3, n, (), k, k)).unwrap();
            assert!(rel_err(&b.narrow(1, 0, 1).unwrap(), &b.narrow(1, 1, 1).unwrap()) > 0.1);
        }
    }
}

#[test]
fn group_layers_jvp_match_finite_differences() {
    let map = VarMap::new();
    let vb = vb(&map, DType::F64);
    for n in [4, 8] {
        let lift = GroupConv::load(2, 3, n, 5, true, vb.pp(format!("lift{n}"))).unwrap();
        check_layer(
            &format!("lifting conv C{n}"),
            &lift,
            &noise(&[2, 2, 7, 7], 11, DType::F64),
        );
        let g = GroupConv::load(2, 3, n, 3, false, vb.pp(format!("g{n}"))).unwrap();
        check_layer(
            &format!("group conv C{n}"),
            &g,
            &noise(&[2, 2, n, 6, 6], 12, DType::F64),
        );
    }
    check_layer(
        "group max pool",
        &GroupMaxPool,
        &noise(&[2, 3, 8, 4, 4], 13, DType::F64),
    );
}

fn small_cnn(dtype: DType) -> (VarMap, Cnn) {
    let map = VarMap::new();
    let cfg = CnnConfig {
        widths: vec![4, 6],
        blocks: 2,
    };
    let m = Cnn::new(&cfg, 1, 5, vb(&map, dtype)).unwrap();
    (map, m)
}

fn small_gcnn(n: usize, dtype: DType) -> (VarMap, Gcnn) {
    let map = VarMap::new();
    let cfg = GcnnConfig {
        group_order: n,
        widths: vec![3, 4, 4],
        kernel_size: 5,
    };
    let m = Gcnn::new(&cfg, 1, 5, vb(&map, dtype)).unwrap();
    (map, m)
}

/// A few train-mode passes so batch-norm running statistics are far from (0, 1).
fn warm_up<M: Model>(m: &M, b: usize, s: usize, dtype: DType) {
    let mut rng = Rng::seed_from_u64(0);
    for seed in 0..3 {
        let x = ((blobs(b, s, 50 + seed, dtype) * 2.0).unwrap() - 0.3).unwrap();
        m.forward_train(&x, &mut rng).unwrap();
    }
}

#[test]
fn whole_models_jvp_match_finite_differences() {
    let x = blobs(2, 12, 3, DType::F64);
    let (_m, cnn) = small_cnn(DType::F64);
    warm_up(&cnn, 4, 12, DType::F64);
    let e = fd_check(&|x| cnn.forward(x), &cnn, &x);
    println!("CNN jvp vs FD: {e:.2e}");
    assert!(e < 1e-6, "CNN jvp vs f64 FD: {e:.3e}");
    for n in [4, 8] {
        let (_m, g) = small_gcnn(n, DType::F64);
        warm_up(&g, 4, 12, DType::F64);
        let e = fd_check(&|x| g.forward(x), &g, &x);
        println!("C{n} G-CNN jvp vs FD: {e:.2e}");
        assert!(e < 1e-6, "C{n} G-CNN jvp vs f64 FD: {e:.3e}");
    }
}

/// Every trainable tensor (not the batch-norm running buffers) gets a non-zero gradient.
fn assert_all_grads<M: Model>(name: &str, map: &VarMap, m: &M, s: usize) {
    let mut rng = Rng::seed_from_u64(1);
    let x = blobs(4, s, 8, DType::F32);
    let logits = m.forward_train(&x, &mut rng).unwrap();
    let target = Tensor::new(&[0u32, 1, 2, 3], &DEV).unwrap();
    let loss = candle_nn::loss::cross_entropy(&logits, &target).unwrap();
    let grads = loss.backward().unwrap();
    let data = map.data().lock().unwrap();
    let mut checked = 0;
    for (key, var) in data.iter() {
        if key.ends_with("running_mean") || key.ends_with("running_var") {
            continue;
        }
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: {key} has no gradient"));
        let norm = g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm > 0.0 && norm.is_finite(), "{name}: {key} has gradient norm {norm}");
        checked += 1;
    }
    println!("{name}: {checked} trainable tensors, all with non-zero gradients");
    assert!(checked > 5);
}

#[test]
fn every_trainable_tensor_gets_a_gradient() {
    let (map, cnn) = small_cnn(DType::F32);
    assert_all_grads("CNN", &map, &cnn, 16);
    for n in [4, 8] {
        let (map, g) = small_gcnn(n, DType::F32);
        assert_all_grads(&format!("C{n} G-CNN"), &map, &g, 16);
    }
}

fn default_gcnn(n: usize) -> (VarMap, Gcnn) {
    let map = VarMap::new();
    let cfg = GcnnConfig {
        group_order: n,
        ..GcnnConfig::default()
    };
    let m = Gcnn::new(&cfg, 1, 10, vb(&map, DType::F32)).unwrap();
    (map, m)
}

#[test]
fn c4_gcnn_logits_are_invariant_to_quarter_turns() {
    let (_m, g) = default_gcnn(4);
    warm_up(&g, 8, 28, DType::F32);
    let x = (blobs(4, 28, 21, DType::F32) + (noise(&[4, 1, 28, 28], 22, DType::F32) * 0.3).unwrap()).unwrap();
    let y = g.forward(&x).unwrap();
    let scale = y.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0);
    let mut xr = x.clone();
    for k in 1..=3 {
        // Exact index rotation of the input: out[i][j] = x[W−1−j][i].
        xr = xr.transpose(2, 3).unwrap().contiguous().unwrap().flip(&[3]).unwrap();
        let yr = g.forward(&xr).unwrap();
        let d = (&yr - &y)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        println!("C4: max |logits(rot90^{k} x) − logits(x)| = {d:.2e} (logit scale {scale:.2})");
        assert!(d <= 1e-5 * scale, "rot90^{k}: logits moved by {d:e}");
    }
    // And the test can fail: the logits do depend on the input.
    let other = g.forward(&x.flip(&[0]).unwrap()).unwrap();
    assert!(
        (&other - &y)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 1e-3
    );
}

/// Mean over images of ‖f(ρ(45°)x) − f(x)‖ / ‖f(x)‖.
fn rel_change_45<M: Model>(m: &M, x: &Tensor) -> f32 {
    let xr = apply(x, Transform::Rotate, &[std::f64::consts::FRAC_PI_4], Padding::Zeros).unwrap();
    let (y, yr) = (m.forward(x).unwrap(), m.forward(&xr).unwrap());
    let num = (&yr - &y).unwrap().sqr().unwrap().sum(1).unwrap().sqrt().unwrap();
    let den = y.sqr().unwrap().sum(1).unwrap().sqrt().unwrap();
    (num / den).unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn c8_gcnn_is_closer_to_invariant_under_45_degrees_than_the_cnn() {
    let x = blobs(8, 28, 31, DType::F32);
    let (_m, g) = default_gcnn(8);
    warm_up(&g, 8, 28, DType::F32);
    let map = VarMap::new();
    let cnn = Cnn::new(&CnnConfig::default(), 1, 10, vb(&map, DType::F32)).unwrap();
    warm_up(&cnn, 8, 28, DType::F32);
    let (eg, ec) = (rel_change_45(&g, &x), rel_change_45(&cnn, &x));
    println!("45° rotation, relative logit change: C8 G-CNN {eg:.4}, CNN {ec:.4}");
    assert!(
        eg < 0.5 * ec,
        "C8 G-CNN {eg} is not clearly more invariant than the CNN {ec}"
    );
}

fn count_params(map: &VarMap) -> usize {
    let data = map.data().lock().unwrap();
    data.iter()
        .filter(|(k, _)| !k.ends_with("running_mean") && !k.ends_with("running_var"))
        .map(|(_, v): (&String, &Var)| v.elem_count())
        .sum()
}

/// `cargo test --release --test cnn -- --ignored --nocapture timings`: parameter counts and
/// per-batch-of-128 times for the default CNN and C8 G-CNN (reported, not asserted).
#[test]
#[ignore]
fn timings() {
    use std::time::Instant;
    let x = blobs(128, 28, 1, DType::F32);
    let target = Tensor::from_vec((0..128u32).map(|i| i % 10).collect::<Vec<_>>(), 128, &DEV).unwrap();
    let dx = noise(&[1, 128, 1, 28, 28], 2, DType::F32);
    let cnn_map = VarMap::new();
    let cnn = Cnn::new(&CnnConfig::default(), 1, 10, vb(&cnn_map, DType::F32)).unwrap();
    let (g_map, g) = default_gcnn(8);
    let models: [(&str, &VarMap, &dyn Model); 2] = [("CNN", &cnn_map, &cnn), ("C8 G-CNN", &g_map, &g)];
    for (name, map, m) in models {
        let mut rng = Rng::seed_from_u64(0);
        let time = |f: &mut dyn FnMut()| {
            f();
            let t = Instant::now();
            f();
            f();
            t.elapsed().as_secs_f64() / 2.0 * 1e3
        };
        let fwd = time(&mut || {
            m.forward(&x).unwrap();
        });
        let train = time(&mut || {
            let l = candle_nn::loss::cross_entropy(&m.forward_train(&x, &mut rng).unwrap(), &target).unwrap();
            l.backward().unwrap();
        });
        let jvp = time(&mut || {
            m.jvp(&x, &dx, &mut Tape::off()).unwrap();
        });
        println!(
            "{name}: {} params; batch 128: forward {fwd:.0} ms, forward+backward {train:.0} ms, jvp (T=1) {jvp:.0} ms",
            count_params(map)
        );
    }
}

/// The layerwise tape's channels at the output sum to the end-to-end Lie derivative J·L_X x
/// (telescoping, DESIGN.md), through residual branches and group maps alike, and every step of
/// the walk is recorded once.
fn assert_layerwise_sums<M: Model>(name: &str, m: &M, x: &Tensor, expected_steps: usize) {
    let lx = image_lie_derivative(x, Transform::Rotate, Stencil::Central)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let (_, end_to_end) = m.jvp(x, &lx, &mut Tape::off()).unwrap();
    let mut tape = Tape::layerwise(Transform::Rotate, Stencil::Central);
    let (_, dy) = m.jvp(x, &lx, &mut tape).unwrap();
    let steps = tape.steps();
    assert_eq!(steps.len(), expected_steps, "{name}: recorded steps");
    assert_eq!(
        dy.dim(0).unwrap(),
        steps.len() + 1,
        "{name}: one channel per step plus the canonical one"
    );
    let sum = dy.sum_keepdim(0).unwrap();
    let e = rel_err(&sum, &end_to_end);
    println!("{name}: {} layerwise steps sum to J·L_X x within {e:.2e}", steps.len());
    assert!(e < 1e-10, "{name}: layerwise sum vs end-to-end {e:.3e}");
}

#[test]
fn layerwise_steps_sum_to_the_end_to_end_lie_derivative() {
    let x = blobs(2, 12, 4, DType::F64);
    let (_m, cnn) = small_cnn(DType::F64);
    warm_up(&cnn, 4, 12, DType::F64);
    // stem 3 + 2 stages × (block0 9 with its shortcut, block1 7) + pool + head.
    assert_layerwise_sums("CNN", &cnn, &x, 3 + 2 * 16 + 2);
    let (_m, g) = small_gcnn(8, DType::F64);
    warm_up(&g, 4, 12, DType::F64);
    // 3 blocks × (conv, bn, relu) + 2 pools (12 → 6 → 3) + group pool + pool + head.
    assert_layerwise_sums("C8 G-CNN", &g, &x, 9 + 2 + 3);
}

#[test]
fn initialisation_is_deterministic_and_per_parameter() {
    let x = blobs(2, 28, 6, DType::F32);
    let (_a, g1) = default_gcnn(8);
    let (_b, g2) = default_gcnn(8);
    let (y1, y2) = (g1.forward(&x).unwrap(), g2.forward(&x).unwrap());
    assert_eq!(y1.to_vec2::<f32>().unwrap(), y2.to_vec2::<f32>().unwrap());
    // Same shapes, different names: different values.
    let map = VarMap::new();
    let vb = vb(&map, DType::F32);
    let c1 = Conv2d::load(2, 2, 3, ConvSpec::same(3), false, vb.pp("a")).unwrap();
    let c2 = Conv2d::load(2, 2, 3, ConvSpec::same(3), false, vb.pp("b")).unwrap();
    assert!(
        rel_err(
            &c1.weight().to_dtype(DType::F64).unwrap(),
            &c2.weight().to_dtype(DType::F64).unwrap()
        ) > 0.1
    );
}

#[test]
fn im2col_conv_and_its_gradients_match_candles_conv2d() {
    // (x shape, w shape, padding, stride): square and non-square kernels and images, strides 1-2.
    let cases: [([usize; 4], [usize; 4], usize, usize); 5] = [
        ([2, 3, 9, 9], [4, 3, 3, 3], 1, 1),
        ([3, 2, 8, 7], [5, 2, 5, 5], 2, 1),
        ([2, 4, 10, 9], [3, 4, 3, 2], 0, 2),
        ([1, 1, 7, 7], [2, 1, 7, 7], 3, 2),
        ([2, 3, 6, 6], [2, 3, 1, 1], 0, 1),
    ];
    for (i, (xs, ws, pad, stride)) in cases.into_iter().enumerate() {
        let x = Var::from_tensor(&noise(&xs, 10 + i as u64, DType::F64)).unwrap();
        let w = Var::from_tensor(&noise(&ws, 20 + i as u64, DType::F64)).unwrap();
        let ours = liederiv::kernels::im2col::conv2d(&x, &w, pad, stride).unwrap();
        let theirs = x.conv2d(&w, pad, stride, 1, 1).unwrap();
        assert_eq!(ours.dims(), theirs.dims(), "case {i}");
        let e = rel_err(&ours, &theirs);
        assert!(e < 1e-13, "case {i}: forward vs candle {e:.3e}");
        // Gradients of ⟨y, r⟩ for a fixed random r: candle's conv2d backward is the oracle.
        let r = noise(ours.dims(), 30 + i as u64, DType::F64);
        let (go, gt) = (
            (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap(),
            (&theirs * &r).unwrap().sum_all().unwrap().backward().unwrap(),
        );
        for (name, v) in [("input", &x), ("weight", &w)] {
            let e = rel_err(go.get(v).unwrap(), gt.get(v).unwrap());
            assert!(e < 1e-13, "case {i}: {name} gradient vs candle {e:.3e}");
        }
    }
}
