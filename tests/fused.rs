//! The fused CPU kernels (`kernels`) against two independent oracles: the composed,
//! differentiable candle versions (forward values and backward gradients, f32 and f64) and
//! central finite differences in f64 (gradients).
//!
//! Tolerances: in f64 the fused and composed forms differ only by summation order, ~1e-15
//! relative, so 1e-12 is strict. In f32 both round every intermediate to 2^-24 ≈ 6e-8; a row of
//! D ≤ 256 sums accumulates at most a few ulps times √D, so 2e-6 (absolute, on O(1) values)
//! bounds them with margin while still catching any formula error (those are O(1e-2) or more).
//! Finite differences: step 1e-5 in f64 has truncation error O(h²·f''') ≈ 1e-10 and rounding
//! error O(1e-16/h) ≈ 1e-11, so 1e-7 is safe.

mod common;
use candle_core::{DType, Device, Tensor, Var};
use common::max_abs_diff;
use liederiv::kernels::{attention, attention_composed, attention_jvp, attention_jvp_composed};
use liederiv::kernels::{
    gelu_erf, gelu_erf_composed, gelu_erf_derivative, gelu_erf_derivative_composed, gelu_erf_jvp, layer_norm,
    layer_norm_composed, layer_norm_jvp, layer_norm_jvp_composed, softmax, softmax_composed,
};
use liederiv::kernels::{gelu_linear_add, linear, linear_add, linear_composed};

fn randn(shape: &[usize], scale: f64, seed: u64, dtype: DType) -> Tensor {
    common::randn(shape, scale, dtype, &mut common::rng(seed))
}

/// `Σ y ⊙ r` for a fixed random cotangent r, so every output element gets its own weight.
fn probe(y: &Tensor, seed: u64) -> Tensor {
    let r = randn(y.dims(), 1.0, seed, y.dtype());
    (y * r).unwrap().sum_all().unwrap()
}

type Params = (Var, Var, Var);

fn ln_params(shape: &[usize], dtype: DType) -> Params {
    let d = *shape.last().unwrap();
    let x = Var::from_tensor(&randn(shape, 2.0, 1, dtype).affine(1.0, 0.5).unwrap()).unwrap();
    let w = Var::from_tensor(&randn(&[d], 0.5, 2, dtype).affine(1.0, 1.0).unwrap()).unwrap();
    let b = Var::from_tensor(&randn(&[d], 0.5, 3, dtype)).unwrap();
    (x, w, b)
}

/// Values and gradients (x, w, b) of LayerNorm, fused and composed.
fn check_layer_norm(shape: &[usize], dtype: DType, tol: f64) {
    let (x, w, b) = ln_params(shape, dtype);
    let yf = layer_norm(&x, &w, &b, 1e-6).unwrap();
    let yc = layer_norm_composed(&x, &w, &b, 1e-6).unwrap();
    let fwd = max_abs_diff(&yf, &yc);
    assert!(fwd < tol, "layer_norm {shape:?} {dtype:?} forward differs by {fwd}");
    let gf = probe(&yf, 9).backward().unwrap();
    let gc = probe(&yc, 9).backward().unwrap();
    for (name, v) in [("x", &x), ("weight", &w), ("bias", &b)] {
        let (a, c) = (gf.get(v).unwrap(), gc.get(v).unwrap());
        // Parameter gradients are sums over all rows (up to 3200 terms of size O(1)): compare
        // relative to their largest entry; √rows·ulp ≈ 3.4e-6 in f32 is the typical summation
        // error, the bound allows 3× that per unit of `tol`.
        let e = if name == "x" {
            max_abs_diff(a, c)
        } else {
            max_abs_diff(a, c) / max_abs_diff(c, &c.zeros_like().unwrap())
        };
        assert!(
            e < tol,
            "layer_norm {shape:?} {dtype:?} d{name} differs by {e} (bound {tol})"
        );
    }
}

#[test]
fn layer_norm_matches_composed_f64_and_f32() {
    // Small (serial path) and large enough to split rows across the rayon pool.
    for shape in [&[3usize, 5, 17][..], &[64, 50, 64]] {
        check_layer_norm(shape, DType::F64, 1e-12);
        check_layer_norm(shape, DType::F32, 2e-6);
    }
}

fn check_softmax(shape: &[usize], dtype: DType, tol: f64) {
    let x = Var::from_tensor(&randn(shape, 3.0, 4, dtype)).unwrap();
    let yf = softmax(&x).unwrap();
    let yc = softmax_composed(&x).unwrap();
    let fwd = max_abs_diff(&yf, &yc);
    assert!(fwd < tol, "softmax {shape:?} {dtype:?} forward differs by {fwd}");
    let gf = probe(&yf, 5).backward().unwrap();
    let gc = probe(&yc, 5).backward().unwrap();
    let e = max_abs_diff(gf.get(&x).unwrap(), gc.get(&x).unwrap());
    assert!(e < tol, "softmax {shape:?} {dtype:?} dx differs by {e}");
}

#[test]
fn softmax_matches_composed_f64_and_f32() {
    for shape in [&[2usize, 3, 7][..], &[96, 50, 50]] {
        check_softmax(shape, DType::F64, 1e-12);
        check_softmax(shape, DType::F32, 2e-6);
    }
}

/// Linear layer, fused against composed: values and gradients of x, W and b (with and without
/// bias). Outputs and dx sum `in` products, dW and db sum all rows: compared relative to the
/// largest entry, as for LayerNorm's parameter gradients.
fn check_linear(shape: &[usize], out_dim: usize, dtype: DType, tol: f64) {
    let in_dim = *shape.last().unwrap();
    let x = Var::from_tensor(&randn(shape, 1.0, 31, dtype)).unwrap();
    let w = Var::from_tensor(&randn(&[out_dim, in_dim], 0.3, 32, dtype)).unwrap();
    let b = Var::from_tensor(&randn(&[out_dim], 1.0, 33, dtype)).unwrap();
    let rel = |a: &Tensor, c: &Tensor| max_abs_diff(a, c) / max_abs_diff(c, &c.zeros_like().unwrap());
    for bias in [Some(b.as_tensor()), None] {
        let yf = linear(&x, &w, bias).unwrap();
        let yc = linear_composed(&x, &w, bias).unwrap();
        assert_eq!(yf.dims(), yc.dims());
        let fwd = rel(&yf, &yc);
        assert!(
            fwd < tol,
            "linear {shape:?} {dtype:?} bias {} forward differs by {fwd}",
            bias.is_some()
        );
        let gf = probe(&yf, 34).backward().unwrap();
        let gc = probe(&yc, 34).backward().unwrap();
        let mut vars = vec![("x", &x), ("weight", &w)];
        if bias.is_some() {
            vars.push(("bias", &b));
        }
        for (name, v) in vars {
            let e = rel(gf.get(v).unwrap(), gc.get(v).unwrap());
            assert!(e < tol, "linear {shape:?} {dtype:?} d{name} differs by {e}");
        }
    }
}

#[test]
fn linear_matches_composed_f64_and_f32() {
    // A vector, a tiny batch, and the small ViT's MLP input (rows split across the pool).
    for (shape, out_dim) in [(&[7usize][..], 3), (&[2, 3, 5], 4), (&[64, 50, 192], 768)] {
        check_linear(shape, out_dim, DType::F64, 1e-12);
        check_linear(shape, out_dim, DType::F32, 2e-6);
    }
    // A non-contiguous input and weight: the wrapper makes them contiguous.
    let x = randn(&[4, 6, 5], 1.0, 35, DType::F64).transpose(1, 2).unwrap();
    let w = randn(&[6, 3], 1.0, 36, DType::F64).t().unwrap();
    let b = randn(&[3], 1.0, 37, DType::F64);
    let e = max_abs_diff(
        &linear(&x, &w, Some(&b)).unwrap(),
        &linear_composed(&x, &w, Some(&b)).unwrap(),
    );
    assert!(e < 1e-12, "{e}");
    // Zero input features: the output is the bias in every row.
    let (x0, w0) = (
        Tensor::zeros((3, 0), DType::F64, &Device::Cpu).unwrap(),
        Tensor::zeros((3, 0), DType::F64, &Device::Cpu).unwrap(),
    );
    let y0 = linear(&x0, &w0, Some(&b)).unwrap();
    assert_eq!(
        max_abs_diff(&y0, &b.unsqueeze(0).unwrap().broadcast_as((3, 3)).unwrap()),
        0.0
    );
    // …and without a bias, zeros (gemm writes the whole unzeroed output even for an empty sum).
    let z0 = linear(&x0, &w0, None).unwrap();
    assert_eq!(max_abs_diff(&z0, &z0.zeros_like().unwrap()), 0.0);
    // Shapes that do not fit are a clear error, not a panic.
    let err = linear(&x, &w.narrow(1, 0, 4).unwrap(), None).unwrap_err().to_string();
    assert!(err.contains("do not fit"), "{err}");
    let err = linear(&x, &w, Some(&b.narrow(0, 0, 2).unwrap()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("do not fit"), "{err}");
}

#[test]
fn linear_add_matches_linear_plus_residual() {
    // The fused no-gradient path (each block of output rows gets its residual right after its
    // gemm): equal to the bit to the fused linear plus a separate add, and within the linear
    // tolerances of the composed oracle. The small ViT's MLP output over its 128·50 rows (split
    // across the pool), a tiny batch, with and without bias.
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-6)] {
        for (shape, in_dim, out_dim) in [(&[128usize, 50][..], 768, 192), (&[2, 3][..], 5, 4)] {
            let xs: Vec<usize> = shape.iter().copied().chain([in_dim]).collect();
            let rs: Vec<usize> = shape.iter().copied().chain([out_dim]).collect();
            let (x, w) = (randn(&xs, 1.0, 40, dtype), randn(&[out_dim, in_dim], 0.1, 41, dtype));
            let (b, r) = (randn(&[out_dim], 1.0, 42, dtype), randn(&rs, 1.0, 43, dtype));
            for bias in [Some(&b), None] {
                let fused = linear_add(&x, &w, bias, &r).unwrap();
                let separate = (linear(&x, &w, bias).unwrap() + &r).unwrap();
                assert_eq!(max_abs_diff(&fused, &separate), 0.0, "{shape:?} {dtype:?}");
                let composed = (linear_composed(&x, &w, bias).unwrap() + &r).unwrap();
                let e = max_abs_diff(&fused, &composed);
                assert!(e < tol, "{shape:?} {dtype:?} bias {}: {e}", bias.is_some());
            }
        }
    }
    let x = randn(&[3, 4], 1.0, 44, DType::F64);
    let (w, b) = (randn(&[5, 4], 1.0, 45, DType::F64), randn(&[5], 1.0, 46, DType::F64));
    let r = randn(&[5, 3], 1.0, 47, DType::F64).t().unwrap();
    let e = max_abs_diff(
        &linear_add(&x, &w, Some(&b), &r).unwrap(),
        &(linear_composed(&x, &w, Some(&b)).unwrap() + &r).unwrap(),
    );
    assert!(e < 1e-12, "non-contiguous residual: {e}");
    // Training (variables among the operands): one node over (x, [W | b], r), equal to linear +
    // residual in value and in the gradient of every operand.
    let vars = [&x, &w, &b, &r].map(|t| Var::from_tensor(t).unwrap());
    let [xv, wv, bv, rv] = &vars;
    let y = linear_add(xv, wv, Some(bv), rv).unwrap();
    let yc = (linear_composed(xv, wv, Some(bv)).unwrap() + rv.as_tensor()).unwrap();
    assert!(max_abs_diff(&y, &yc) < 1e-12);
    let (g, gc) = (probe(&y, 48).backward().unwrap(), probe(&yc, 48).backward().unwrap());
    for v in &vars {
        let e = max_abs_diff(g.get(v).unwrap(), gc.get(v).unwrap());
        assert!(e < 1e-12, "gradient of a {:?} operand: {e}", v.dims());
    }
    // A residual that does not fit the output is a clear error.
    let err = linear_add(&x, &w, Some(&b), &r.narrow(1, 0, 4).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("shape mismatch"), "{err}");
}

#[test]
fn gelu_linear_add_matches_gelu_then_linear_plus_residual() {
    // A transformer MLP's second layer onto the residual stream. Without a gradient: equal to
    // the bit to GELU then linear_add. In training: one node keeping h (not gelu(h)) whose
    // backward recomputes gelu(h) in chunks of 8 images (20 images: chunks of 8, 8, 4); values
    // and every operand's gradient equal to the separate fused ops' (GELU's exact backward) in
    // f64 to 1e-12, in f32 to 2e-6 relative.
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-6)] {
        let h = randn(&[20, 9, 48], 2.0, 50, dtype);
        let (w, b) = (randn(&[16, 48], 0.2, 51, dtype), randn(&[16], 1.0, 52, dtype));
        let r = randn(&[20, 9, 16], 1.0, 53, dtype);
        let separate = |h: &Tensor, w: &Tensor, b: &Tensor, r: &Tensor| {
            (linear(&gelu_erf(h).unwrap(), w, Some(b)).unwrap() + r).unwrap()
        };
        let y = gelu_linear_add(&h, &w, Some(&b), &r).unwrap();
        assert_eq!(
            max_abs_diff(&y, &linear_add(&gelu_erf(&h).unwrap(), &w, Some(&b), &r).unwrap()),
            0.0
        );
        let vars = [&h, &w, &b, &r].map(|t| Var::from_tensor(t).unwrap());
        let [hv, wv, bv, rv] = &vars;
        let y = gelu_linear_add(hv, wv, Some(bv), rv).unwrap();
        let ys = separate(hv, wv, bv, rv);
        assert!(max_abs_diff(&y, &ys) <= tol, "{dtype:?}");
        let (g, gs) = (probe(&y, 54).backward().unwrap(), probe(&ys, 54).backward().unwrap());
        for v in &vars {
            let e = common::rel_err(g.get(v).unwrap(), gs.get(v).unwrap());
            assert!(
                e <= tol,
                "{dtype:?}: gradient of a {:?} operand differs by {e:.2e}",
                v.dims()
            );
        }
        // Without a bias there is nothing to pack with W: GELU and linear_add, still exact.
        let y = gelu_linear_add(hv, wv, None, rv).unwrap();
        let ys = (linear(&gelu_erf(hv).unwrap(), wv, None).unwrap() + rv.as_tensor()).unwrap();
        assert_eq!(max_abs_diff(&y, &ys), 0.0);
    }
}

#[test]
fn softmax_is_shift_invariant_and_stable() {
    // Exact invariance: softmax(x + c) = softmax(x), checked in f64 where x + 1000 keeps
    // 1e-13 of x; in f32, c = 1000 overflows a naive exp (e^1000) but not a max-shifted one.
    let x = randn(&[4, 9], 1.0, 6, DType::F64);
    let a = softmax(&x).unwrap();
    let b = softmax(&(&x + 1000.0).unwrap()).unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-12);
    let big = softmax(&(x.to_dtype(DType::F32).unwrap() * 1000.0).unwrap()).unwrap();
    let rows = big.sum(1).unwrap().to_vec1::<f32>().unwrap();
    assert!(rows.iter().all(|s| (s - 1.0).abs() < 1e-6), "{rows:?}");
}

fn check_gelu(shape: &[usize], dtype: DType, tol: f64) {
    let x = Var::from_tensor(&randn(shape, 3.0, 7, dtype)).unwrap();
    let yf = gelu_erf(&x).unwrap();
    let yc = gelu_erf_composed(&x).unwrap();
    let fwd = max_abs_diff(&yf, &yc);
    assert!(fwd < tol, "gelu {shape:?} {dtype:?} forward differs by {fwd}");
    let gf = probe(&yf, 8).backward().unwrap();
    let gc = probe(&yc, 8).backward().unwrap();
    let e = max_abs_diff(gf.get(&x).unwrap(), gc.get(&x).unwrap());
    assert!(e < tol, "gelu {shape:?} {dtype:?} dx differs by {e}");
}

#[test]
fn gelu_matches_composed_f64_and_f32() {
    for shape in [&[5usize, 11][..], &[128, 50, 256]] {
        check_gelu(shape, DType::F64, 1e-12);
        check_gelu(shape, DType::F32, 2e-6);
    }
}

#[test]
fn gelu_derivative_matches_composed_f64_and_f32() {
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-6)] {
        let x = Var::from_tensor(&randn(&[64, 50, 96], 3.0, 22, dtype)).unwrap();
        let yf = gelu_erf_derivative(&x).unwrap();
        let yc = gelu_erf_derivative_composed(&x).unwrap();
        let fwd = max_abs_diff(&yf, &yc);
        assert!(fwd < tol, "gelu' {dtype:?} differs by {fwd}");
        let gf = probe(&yf, 23).backward().unwrap();
        let gc = probe(&yc, 23).backward().unwrap();
        let e = max_abs_diff(gf.get(&x).unwrap(), gc.get(&x).unwrap());
        assert!(e < tol, "gelu'' {dtype:?} differs by {e}");
    }
}

#[test]
fn gelu_f32_is_within_an_ulp_or_two_of_f64() {
    // The f32 kernel has its own erf and exp (f32 rational and polynomial: erf ≤ 3.2e-7 absolute,
    // exp ≤ 1 ulp); the f64 kernel uses libm's. Every f32 step of 2^-12 on [-8, 8] (65537
    // points, both signs and the switch to ±1 at |x/√2| = 3.92): the f32 GELU and gelu' may
    // differ from the f64 values by 2 ulp of the value plus the erf error, which 0.5 + erf/2
    // halves into an absolute error (cancellation for x ≪ 0) that x scales. A wrong coefficient
    // or piece would show as ≥ 1e-5.
    let xs: Vec<f32> = (-32768..=32768).map(|i| i as f32 / 4096.0).collect();
    let x32 = Tensor::new(xs.as_slice(), &Device::Cpu).unwrap();
    let x64 = x32.to_dtype(DType::F64).unwrap();
    for (name, f) in [
        ("gelu", &gelu_erf as &dyn Fn(&Tensor) -> candle_core::Result<Tensor>),
        ("gelu'", &gelu_erf_derivative),
    ] {
        let y32 = f(&x32).unwrap().to_vec1::<f32>().unwrap();
        let y64 = f(&x64).unwrap().to_vec1::<f64>().unwrap();
        for ((x, a), b) in xs.iter().zip(&y32).zip(&y64) {
            let ulp = (*b as f32).abs().max(f32::MIN_POSITIVE) * f32::EPSILON;
            let err = (f64::from(*a) - b).abs();
            assert!(
                err <= 2.0 * f64::from(ulp) + (1.0 + f64::from(x.abs())) * 1.6e-7,
                "{name}({x}): f32 {a} vs f64 {b} ({:.2} ulp)",
                err / f64::from(ulp)
            );
        }
    }
}

/// Fused attention against the composed one (values and d qkv). The scores sum N = 50 products
/// of O(1) terms, the output and the gradients up to N more: the f32 bound is relative to the
/// largest entry, as for LayerNorm's parameter gradients.
fn check_attention(b: usize, n: usize, heads: usize, hd: usize, dtype: DType, tol: f64) {
    let qkv = Var::from_tensor(&randn(&[b, n, 3 * heads * hd], 1.0, 17, dtype)).unwrap();
    let scale = (hd as f64).powf(-0.5);
    let yf = attention(&qkv, heads, scale).unwrap();
    let yc = attention_composed(&qkv, heads, scale).unwrap();
    let rel = |a: &Tensor, c: &Tensor| max_abs_diff(a, c) / max_abs_diff(c, &c.zeros_like().unwrap());
    let fwd = rel(&yf, &yc);
    assert!(fwd < tol, "attention {dtype:?} forward differs by {fwd} (relative)");
    let gf = probe(&yf, 18).backward().unwrap();
    let gc = probe(&yc, 18).backward().unwrap();
    let (a, c) = (gf.get(&qkv).unwrap(), gc.get(&qkv).unwrap());
    // q, k and v each get their own gradient (a formula error in one third shows here).
    for (part, name) in ["q", "k", "v"].iter().enumerate() {
        let w = heads * hd;
        let e = rel(&a.narrow(2, part * w, w).unwrap(), &c.narrow(2, part * w, w).unwrap());
        assert!(e < tol, "attention {dtype:?} d{name} differs by {e} (relative)");
    }
}

#[test]
fn attention_matches_composed_f64_and_f32() {
    // A tiny case and the small ViT's (N = 50, 3 heads of 64) with enough (batch, head) tasks
    // to spread over the pool.
    check_attention(2, 5, 2, 3, DType::F64, 1e-12);
    check_attention(2, 5, 2, 3, DType::F32, 2e-6);
    check_attention(8, 50, 3, 64, DType::F64, 1e-12);
    check_attention(8, 50, 3, 64, DType::F32, 2e-6);
}

#[test]
fn attention_rejects_bad_widths_and_takes_views() {
    let qkv = randn(&[2, 4, 18], 1.0, 19, DType::F32);
    let err = attention(&qkv, 4, 1.0).unwrap_err().to_string();
    assert!(err.contains("heads"), "{err}");
    // A non-contiguous view of the right shape gives the composed result.
    let t = randn(&[2, 18, 4], 1.0, 20, DType::F32).transpose(1, 2).unwrap();
    assert!(!t.is_contiguous());
    let e = max_abs_diff(
        &attention(&t, 3, 0.5).unwrap(),
        &attention_composed(&t, 3, 0.5).unwrap(),
    );
    assert!(e < 1e-6, "{e}");
}

/// Central differences of `f` at x along coordinate `i`.
fn fd(f: &dyn Fn(&Tensor) -> f64, x: &Tensor, i: usize, h: f64) -> f64 {
    let mut v = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let v0 = v[i];
    v[i] = v0 + h;
    let plus = f(&Tensor::from_vec(v.clone(), x.dims(), &Device::Cpu).unwrap());
    v[i] = v0 - h;
    let minus = f(&Tensor::from_vec(v, x.dims(), &Device::Cpu).unwrap());
    (plus - minus) / (2.0 * h)
}

fn check_fd(name: &str, f: &dyn Fn(&Tensor) -> Tensor, x: &Var) {
    let scalar = |t: &Tensor| probe(&f(t), 11).to_scalar::<f64>().unwrap();
    let grads = probe(&f(x), 11).backward().unwrap();
    let g = grads.get(x).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    for i in (0..g.len()).step_by(7) {
        let num = fd(&scalar, x, i, 1e-5);
        assert!(
            (num - g[i]).abs() < 1e-7,
            "{name}: d/dx[{i}] analytic {} vs finite difference {num}",
            g[i]
        );
    }
}

#[test]
fn gradients_match_finite_differences_f64() {
    let (x, w, b) = ln_params(&[3, 4, 10], DType::F64);
    let (wt, bt) = (w.as_tensor().clone(), b.as_tensor().clone());
    check_fd("layer_norm x", &|t| layer_norm(t, &wt, &bt, 1e-6).unwrap(), &x);
    let xt = x.as_tensor().clone();
    check_fd("layer_norm weight", &|t| layer_norm(&xt, t, &bt, 1e-6).unwrap(), &w);
    check_fd("layer_norm bias", &|t| layer_norm(&xt, &wt, t, 1e-6).unwrap(), &b);
    let s = Var::from_tensor(&randn(&[3, 4, 10], 2.0, 12, DType::F64)).unwrap();
    check_fd("softmax", &|t| softmax(t).unwrap(), &s);
    let g = Var::from_tensor(&randn(&[6, 20], 2.0, 13, DType::F64)).unwrap();
    check_fd("gelu", &|t| gelu_erf(t).unwrap(), &g);
    check_fd("gelu'", &|t| gelu_erf_derivative(t).unwrap(), &g);
    let qkv = Var::from_tensor(&randn(&[2, 6, 3 * 2 * 4], 1.0, 21, DType::F64)).unwrap();
    check_fd("attention", &|t| attention(t, 2, 0.5).unwrap(), &qkv);
    let (lx, lw, lb) = (
        Var::from_tensor(&randn(&[2, 3, 5], 1.0, 38, DType::F64)).unwrap(),
        Var::from_tensor(&randn(&[4, 5], 1.0, 39, DType::F64)).unwrap(),
        Var::from_tensor(&randn(&[4], 1.0, 40, DType::F64)).unwrap(),
    );
    let (xt, wt, bt) = (lx.as_tensor().clone(), lw.as_tensor().clone(), lb.as_tensor().clone());
    check_fd("linear x", &|t| linear(t, &wt, Some(&bt)).unwrap(), &lx);
    check_fd("linear weight", &|t| linear(&xt, t, Some(&bt)).unwrap(), &lw);
    check_fd("linear bias", &|t| linear(&xt, &wt, Some(t)).unwrap(), &lb);
}

#[test]
fn attention_jvp_matches_composed_and_stays_differentiable() {
    // Fused (nothing tracks a gradient) against composed, two tangents, f64 and f32, values
    // relative to the largest entry as for the attention itself.
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-6)] {
        for (b, n, heads, hd) in [(2, 5, 2, 3), (8, 50, 3, 64)] {
            let qkv = randn(&[b, n, 3 * heads * hd], 1.0, 41, dtype);
            let dqkv = randn(&[2, b, n, 3 * heads * hd], 1.0, 42, dtype);
            let scale = (hd as f64).powf(-0.5);
            let (o, d_o) = attention_jvp(&qkv, &dqkv, heads, scale).unwrap();
            let (oc, d_oc) = attention_jvp_composed(&qkv, &dqkv, heads, scale).unwrap();
            assert_eq!((o.dims(), d_o.dims()), (oc.dims(), d_oc.dims()));
            let rel = |a: &Tensor, c: &Tensor| max_abs_diff(a, c) / max_abs_diff(c, &c.zeros_like().unwrap());
            assert!(
                rel(&o, &oc) < tol,
                "attention jvp {dtype:?} output differs by {}",
                rel(&o, &oc)
            );
            assert!(
                rel(&d_o, &d_oc) < tol,
                "attention jvp {dtype:?} tangent differs by {}",
                rel(&d_o, &d_oc)
            );
        }
    }
    // When qkv is a variable (LEE-penalised training differentiates the JVP), the gradient
    // flows: the composed path is taken, not the fused one, which has no backward.
    let qkv = Var::from_tensor(&randn(&[2, 6, 3 * 2 * 4], 1.0, 43, DType::F64)).unwrap();
    let dqkv = randn(&[1, 2, 6, 3 * 2 * 4], 1.0, 44, DType::F64);
    let (_, d_o) = attention_jvp(&qkv, &dqkv, 2, 0.5).unwrap();
    let (_, d_oc) = attention_jvp_composed(&qkv, &dqkv, 2, 0.5).unwrap();
    let (g, gc) = (
        probe(&d_o, 45).backward().unwrap(),
        probe(&d_oc, 45).backward().unwrap(),
    );
    assert!(max_abs_diff(g.get(&qkv).unwrap(), gc.get(&qkv).unwrap()) < 1e-12);
}

#[test]
fn layer_norm_and_gelu_jvps_match_composed_and_stay_differentiable() {
    // Fused tangents (nothing tracks a gradient) against the composed JVPs, three tangents.
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-6)] {
        for shape in [&[3usize, 5, 17][..], &[64, 50, 192]] {
            let (x, w, b) = ln_params(shape, dtype);
            let (x, w, b) = (x.as_tensor().detach(), w.as_tensor().detach(), b.as_tensor().detach());
            let mut tshape = vec![3];
            tshape.extend_from_slice(shape);
            let dx = randn(&tshape, 1.0, 46, dtype);
            let (y, dy) = layer_norm_jvp(&x, &dx, &w, &b, 1e-6).unwrap();
            let (yc, dyc) = layer_norm_jvp_composed(&x, &dx, &w, &b, 1e-6).unwrap();
            assert!(max_abs_diff(&y, &yc) < tol, "layer_norm jvp {dtype:?} y");
            let e = max_abs_diff(&dy, &dyc);
            assert!(e < tol, "layer_norm jvp {shape:?} {dtype:?} tangent differs by {e}");
            let (y, dy) = gelu_erf_jvp(&x, &dx).unwrap();
            let dyc = (gelu_erf_derivative_composed(&x)
                .unwrap()
                .unsqueeze(0)
                .unwrap()
                .broadcast_mul(&dx))
            .unwrap();
            assert!(
                max_abs_diff(&y, &gelu_erf_composed(&x).unwrap()) < tol,
                "gelu jvp {dtype:?} y"
            );
            let e = max_abs_diff(&dy, &dyc);
            assert!(e < tol, "gelu jvp {shape:?} {dtype:?} tangent differs by {e}");
        }
    }
    // With x a variable the composed, differentiable forms are taken: gradients through the
    // tangents equal those through the composed JVP.
    let (x, w, b) = ln_params(&[2, 3, 8], DType::F64);
    let dx = randn(&[2, 2, 3, 8], 1.0, 47, DType::F64);
    let (_, dy) = layer_norm_jvp(&x, &dx, &w, &b, 1e-6).unwrap();
    let (_, dyc) = layer_norm_jvp_composed(&x, &dx, &w, &b, 1e-6).unwrap();
    let (g, gc) = (probe(&dy, 48).backward().unwrap(), probe(&dyc, 48).backward().unwrap());
    for v in [&x, &w] {
        assert!(max_abs_diff(g.get(v).unwrap(), gc.get(v).unwrap()) < 1e-12);
    }
    let (_, dy) = gelu_erf_jvp(&x, &dx).unwrap();
    let dyc = gelu_erf_derivative_composed(&x)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .broadcast_mul(&dx)
        .unwrap();
    let (g, gc) = (probe(&dy, 49).backward().unwrap(), probe(&dyc, 49).backward().unwrap());
    assert!(max_abs_diff(g.get(&x).unwrap(), gc.get(&x).unwrap()) < 1e-12);
    // Tangents of the wrong shape are a clear error.
    let err = layer_norm_jvp(&x, &x, &w, &b, 1e-6).unwrap_err().to_string();
    assert!(err.contains("do not fit"), "{err}");
}

#[test]
fn non_contiguous_inputs_and_fallback_dtypes() {
    // A transposed view: the wrapper makes it contiguous, the result equals the composed one.
    let x = randn(&[2, 16, 8], 1.0, 14, DType::F32).transpose(1, 2).unwrap();
    assert!(!x.is_contiguous());
    assert!(max_abs_diff(&softmax(&x).unwrap(), &softmax_composed(&x).unwrap()) < 1e-6);
    assert!(max_abs_diff(&gelu_erf(&x).unwrap(), &gelu_erf_composed(&x).unwrap()) < 1e-6);
    let (w, b) = (randn(&[16], 1.0, 15, DType::F32), randn(&[16], 1.0, 16, DType::F32));
    let e = max_abs_diff(
        &layer_norm(&x, &w, &b, 1e-5).unwrap(),
        &layer_norm_composed(&x, &w, &b, 1e-5).unwrap(),
    );
    assert!(e < 2e-6, "{e}");
    // f16 has no fused kernel: the portable form (candle's own gelu_erf) runs, bit for bit, and
    // agrees with the composed form within f16's rounding (2^-9 at values of 2-4).
    let h = x.to_dtype(DType::F16).unwrap();
    assert_eq!(max_abs_diff(&gelu_erf(&h).unwrap(), &h.gelu_erf().unwrap()), 0.0);
    let e = max_abs_diff(&gelu_erf(&h).unwrap(), &gelu_erf_composed(&h).unwrap());
    assert!(e <= 2f64.powi(-9), "{e}");
    // A weight of the wrong width is a clear error, not a panic.
    let err = layer_norm(&x, &w.narrow(0, 0, 8).unwrap(), &b, 1e-5)
        .unwrap_err()
        .to_string();
    assert!(err.contains("weight"), "{err}");
}
