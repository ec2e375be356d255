//! Fused CPU kernels, with a backward, for the three row-wise ops that dominate a small ViT's
//! training step once the matmuls are fast: LayerNorm over the last axis, softmax over the last
//! axis and the exact (erf) GELU.
//!
//! Written from candle ops (as `layers.rs` must, because candle-nn's fused LayerNorm / softmax
//! have no backward), each of these is 4–8 elementwise/reduction kernels forward and 2–3× that
//! backward, each allocating a full-size temporary. Here each is one candle `CustomOp` whose
//! forward is one pass over the rows, split across the rayon pool, and whose `bwd` is a second
//! `CustomOp` of the same kind (timm / PyTorch compute the same formulas in their fused kernels).
//! The ops are exact rewrites: the tests (`tests/fused.rs`) hold them to the composed versions
//! and to f64 finite differences.
//!
//! On other devices or dtypes (CUDA, f16/bf16) the public functions fall back to the composed,
//! differentiable form, so callers never need to branch. Second derivatives through the fused
//! backward are not supported and fail loudly (`BackwardNotSupported`) rather than being cut.

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, WithDType, D,
};
use rayon::prelude::*;

/// The float element types the kernels run on.
pub(super) trait Real: WithDType {
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
    fn erf(self) -> Self;
    fn maximum(self, other: Self) -> Self;
}

macro_rules! real {
    ($t:ty, $erf:path) => {
        impl Real for $t {
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn erf(self) -> Self {
                $erf(self)
            }
            fn maximum(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
        }
    };
}
// f64: candle's own erf (libm), so the fused GELU matches the composed `x·Φ(x)` bit for bit.
// f32: libm's `erff` (branches and two `expf` per call) was ~40% of the small ViT's forward; see
// [`erf_f32`].
real!(f32, erf_f32);
real!(f64, candle_core::cpu::erf::erf_f64);

/// erf in f32 from 16 degree-7 polynomial pieces on [0, 4), evaluated in f64 (table and its
/// generator: `scripts/erf_table.py`; worst |error| on the pieces: 5.21e-12 against Python's `math.erf`), so
/// the result is erf(x) correctly rounded to f32 but for near-ties: within 1 ulp of libm's
/// `erff`, and several times faster (no branches beyond the piece index, no `exp`). For
/// |x| ≥ 4, erf(x) rounds to ±1 in f32 (1 − erf(4) ≈ 1.5e-8 < ulp(1)/2).
fn erf_f32(x: f32) -> f32 {
    let z = f64::from(x).abs();
    let y = if z >= 4.0 {
        1.0
    } else {
        // z·4 < 16 exactly (scaling by 4 is exact); NaN casts to piece 0 and stays NaN.
        let i = (z * 4.0) as usize;
        let u = 8.0 * (z - i as f64 * 0.25) - 1.0;
        ERF_PIECES[i].iter().rev().fold(0.0, |acc, &c| acc * u + c)
    };
    y.copysign(f64::from(x)) as f32
}

/// erf(z) on [i/4, (i+1)/4) is Σ_k ERF_PIECES[i][k]·u^k with u = 8(z − i/4) − 1.
#[rustfmt::skip]
const ERF_PIECES: [[f64; 8]; 16] = [
    [1.40316204798739380e-01, 1.38860658699321848e-01, -2.16969770915008409e-03, -7.00631570367968304e-04, 1.67737781694432542e-05, 3.17933000476555705e-06, -8.57862267888975794e-08, -1.13751008612439364e-08],
    [4.04116909429613425e-01, 1.22544101193230837e-01, -5.74425457673191642e-03, -4.58742566077918745e-04, 4.06689384482294969e-05, 1.38779636360553127e-06, -1.89805882566673745e-07, -2.60111931993378676e-09],
    [6.23240882185315259e-01, 9.54374419702861548e-02, -7.45605005462008502e-03, -1.08734071476712657e-04, 4.30805223429198136e-05, -8.36557245253999326e-07, -1.56922854932517453e-07, 6.57887966326597962e-09],
    [7.84075061060706457e-01, 6.55931306614575410e-02, -7.17424869318048983e-03, 1.81491403660638539e-04, 2.74407026875644888e-05, -2.05123555341302222e-06, -3.97677586416733675e-08, 8.81872352920254343e-09],
    [8.88388231704499876e-01, 3.97842448126176917e-02, -5.59465951612198031e-03, 3.17289712177259986e-04, 6.82986521072237451e-06, -1.87144689922646990e-06, 5.85522812457384134e-08, 4.57549731436301954e-09],
    [9.48170072784070062e-01, 2.12949717108483205e-02, -3.66007332616841846e-03, 3.08472086621880415e-04, -7.44612131092781127e-06, -9.34034876109990364e-07, 8.40312707195423059e-08, -6.53258780403120909e-10],
    [9.78443733240257685e-01, 1.00590323777320079e-02, -2.04324096050326589e-03, 2.24298087867835783e-04, -1.21383506126310214e-05, -6.51658407235800041e-08, 5.49183806486386317e-08, -2.92790502953721443e-09],
    [9.91990057669459913e-01, 4.19322855300589825e-03, -9.82787920984900046e-04, 1.31720884586905562e-04, -1.03174596320920742e-05, 3.49806891453141588e-07, 1.58295667684882346e-08, -2.34462049775174819e-09],
    [9.97345970639875734e-01, 1.54260257680802204e-03, -4.09753788909278729e-04, 6.45261814721242999e-05, -6.43585191665088652e-06, 3.81334537280508812e-07, -6.78355569633248834e-09, -8.95617802143533481e-10],
    [9.99217061781831783e-01, 5.00809732728202395e-04, -1.48677880526236586e-04, 2.68174476251159533e-05, -3.20639533066269244e-06, 2.55050524700095593e-07, -1.18083160471904591e-08, 5.37596633876091801e-11],
    [9.99794624263841913e-01, 1.43484390744602619e-04, -4.70808151656549172e-05, 9.55161361637646422e-06, -1.32185179551116971e-06, 1.28720923253666797e-07, -8.56668103815794169e-09, 3.22387450069072656e-10],
    [9.99952145160319161e-01, 3.62785353587857795e-05, -1.30376006553222137e-05, 2.93464060530101989e-06, -4.59404032072518315e-07, 5.22848022654898159e-08, -4.36512875411770862e-09, 2.51795029271306703e-10],
    [9.99990103265426811e-01, 8.09483540245570232e-06, -3.16204674142147725e-06, 7.81288689410963855e-07, -1.36118156435448268e-07, 1.76072241231395310e-08, -1.73870864357366078e-09, 1.27450050513289170e-10],
    [9.99998184718598582e-01, 1.59396759816243794e-06, -6.72455906417745161e-07, 1.80826121298771625e-07, -3.46365192597600935e-08, 4.99777641493892588e-09, -5.65065441598353599e-10, 4.90487650495197158e-11],
    [9.99999704859817151e-01, 2.76990034991930756e-07, -1.25511417076137590e-07, 3.64721768342235464e-08, -7.60799924841024650e-09, 1.20816823212521740e-09, -1.53206250622961481e-10, 1.51771928358357400e-11],
    [9.99999957486058855e-01, 4.24777979735058153e-08, -2.05752770368650936e-08, 6.42283481955274738e-09, -1.44791245154691064e-09, 2.50486742459088418e-10, -3.51242032123491607e-11, 3.87956333725014701e-12],
];

/// Rows per rayon task: below this many elements a task is not worth its scheduling cost.
const MIN_TASK_ELEMS: usize = 16 * 1024;

/// The contiguous data of one operand (the public wrappers make operands contiguous).
pub(super) fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [T]> {
    let data = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{op}: operand with shape {:?} is not contiguous", l.dims()),
    }
}

/// Size of the last axis of a layout (rank ≥ 1 is checked by the wrappers).
fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1)
}

/// Fill `out` row by row (rows of length `d`), in parallel over blocks of rows.
fn par_rows<T: Send>(out: &mut [T], d: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    if d == 0 {
        return;
    }
    let rows_per_task = (MIN_TASK_ELEMS / d).max(1);
    let run = |(task, block): (usize, &mut [T])| {
        for (j, row) in block.chunks_mut(d).enumerate() {
            f(task * rows_per_task + j, row);
        }
    };
    if out.len() <= MIN_TASK_ELEMS {
        out.chunks_mut(d * rows_per_task).enumerate().for_each(run);
    } else {
        out.par_chunks_mut(d * rows_per_task).enumerate().for_each(run);
    }
}

/// Mean and 1/σ of one row (biased variance, as PyTorch), accumulated in the element type.
fn moments<T: Real>(x: &[T], eps: T) -> (T, T) {
    let n = T::from_f64(x.len() as f64);
    let mean = x.iter().fold(T::from_f64(0.0), |a, &v| a + v) / n;
    let var = x.iter().fold(T::from_f64(0.0), |a, &v| a + (v - mean) * (v - mean)) / n;
    (mean, T::from_f64(1.0) / (var + eps).sqrt())
}

/// Dispatch a kernel on the dtype of its first operand.
macro_rules! by_dtype {
    ($s:expr, $op:expr, $kernel:ident ( $($arg:expr),* )) => {
        match $s {
            CpuStorage::F32(_) => $kernel::<f32>($($arg),*),
            CpuStorage::F64(_) => $kernel::<f64>($($arg),*),
            _ => bail!("{}: only f32 and f64 are supported by the fused CPU kernel", $op),
        }
    };
}
pub(super) use by_dtype;

// ---------------------------------------------------------------------------------------------
// LayerNorm

/// `y = (x − mean)/σ · weight + bias` over the last axis; `x: (..., D)`, `weight, bias: (D)`.
struct LayerNormOp {
    eps: f64,
}

fn ln_fwd<T: Real>(
    eps: f64,
    xs: &CpuStorage,
    xl: &Layout,
    ws: &CpuStorage,
    wl: &Layout,
    bs: &CpuStorage,
    bl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (x, w, b) = (
        slice::<T>(xs, xl, "layer_norm")?,
        slice::<T>(ws, wl, "layer_norm")?,
        slice::<T>(bs, bl, "layer_norm")?,
    );
    let d = last_dim(xl);
    let eps = T::from_f64(eps);
    let mut out = vec![T::from_f64(0.0); x.len()];
    par_rows(&mut out, d, |r, y| {
        let xr = &x[r * d..(r + 1) * d];
        let (mean, rstd) = moments(xr, eps);
        for i in 0..d {
            y[i] = (xr[i] - mean) * rstd * w[i] + b[i];
        }
    });
    Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_dtype!(xs, self.name(), ln_fwd(self.eps, xs, xl, ws, wl, bs, bl))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dx = x.apply_op3(w, &g, LayerNormGradInput { eps: self.eps })?;
        // (2, D): row 0 is d weight, row 1 is d bias.
        let dwb = x.apply_op2(&g, LayerNormGradParams { eps: self.eps })?;
        Ok((Some(dx), Some(dwb.get(0)?), Some(dwb.get(1)?)))
    }
}

/// d x = (ĝ − mean(ĝ) − x̂·mean(ĝ ⊙ x̂)) / σ with ĝ = g ⊙ weight.
struct LayerNormGradInput {
    eps: f64,
}

fn ln_grad_x<T: Real>(
    eps: f64,
    xs: &CpuStorage,
    xl: &Layout,
    ws: &CpuStorage,
    wl: &Layout,
    gs: &CpuStorage,
    gl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (x, w, g) = (
        slice::<T>(xs, xl, "layer_norm grad")?,
        slice::<T>(ws, wl, "layer_norm grad")?,
        slice::<T>(gs, gl, "layer_norm grad")?,
    );
    let d = last_dim(xl);
    let (eps, n) = (T::from_f64(eps), T::from_f64(d as f64));
    let mut out = vec![T::from_f64(0.0); x.len()];
    par_rows(&mut out, d, |r, dx| {
        let (xr, gr) = (&x[r * d..(r + 1) * d], &g[r * d..(r + 1) * d]);
        let (mean, rstd) = moments(xr, eps);
        let (mut sg, mut sgx) = (T::from_f64(0.0), T::from_f64(0.0));
        for i in 0..d {
            let gh = gr[i] * w[i];
            sg += gh;
            sgx += gh * (xr[i] - mean) * rstd;
        }
        let (mg, mgx) = (sg / n, sgx / n);
        for i in 0..d {
            let xhat = (xr[i] - mean) * rstd;
            dx[i] = (gr[i] * w[i] - mg - xhat * mgx) * rstd;
        }
    });
    Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
}

impl CustomOp3 for LayerNormGradInput {
    fn name(&self) -> &'static str {
        "fused-layer-norm-grad-input"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_dtype!(xs, self.name(), ln_grad_x(self.eps, xs, xl, ws, wl, gs, gl))
    }
}

/// `(2, D)`: Σ_rows g ⊙ x̂ (weight gradient) and Σ_rows g (bias gradient).
struct LayerNormGradParams {
    eps: f64,
}

fn ln_grad_params<T: Real>(
    eps: f64,
    xs: &CpuStorage,
    xl: &Layout,
    gs: &CpuStorage,
    gl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (x, g) = (
        slice::<T>(xs, xl, "layer_norm grad")?,
        slice::<T>(gs, gl, "layer_norm grad")?,
    );
    let d = last_dim(xl);
    let eps = T::from_f64(eps);
    let zero = T::from_f64(0.0);
    let rows = x.len().checked_div(d).unwrap_or(0);
    // Partial sums per block of rows (in parallel), then a serial reduction of the few partials.
    let rows_per_task = (MIN_TASK_ELEMS / d.max(1)).max(1);
    let partial = |task: usize| {
        let mut acc = vec![zero; 2 * d];
        for r in task * rows_per_task..((task + 1) * rows_per_task).min(rows) {
            let (xr, gr) = (&x[r * d..(r + 1) * d], &g[r * d..(r + 1) * d]);
            let (mean, rstd) = moments(xr, eps);
            for i in 0..d {
                acc[i] += gr[i] * (xr[i] - mean) * rstd;
                acc[d + i] += gr[i];
            }
        }
        acc
    };
    let tasks = rows.div_ceil(rows_per_task);
    let partials: Vec<Vec<T>> = if x.len() <= MIN_TASK_ELEMS {
        (0..tasks).map(partial).collect()
    } else {
        (0..tasks).into_par_iter().map(partial).collect()
    };
    let mut out = vec![zero; 2 * d];
    for p in partials {
        for (o, v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
    Ok((T::to_cpu_storage_owned(out), Shape::from((2, d))))
}

impl CustomOp2 for LayerNormGradParams {
    fn name(&self) -> &'static str {
        "fused-layer-norm-grad-params"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(xs, self.name(), ln_grad_params(self.eps, xs, xl, gs, gl))
    }
}

// ---------------------------------------------------------------------------------------------
// Softmax

/// Softmax over the last axis, shifted by the row maximum.
struct SoftmaxOp;

fn softmax_fwd<T: Real>(xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
    let x = slice::<T>(xs, xl, "softmax")?;
    let d = last_dim(xl);
    let mut out = vec![T::from_f64(0.0); x.len()];
    par_rows(&mut out, d, |r, s| {
        let xr = &x[r * d..(r + 1) * d];
        let m = xr.iter().fold(xr[0], |a, &v| a.maximum(v));
        let mut sum = T::from_f64(0.0);
        for i in 0..d {
            s[i] = (xr[i] - m).exp();
            sum += s[i];
        }
        for v in s.iter_mut() {
            *v /= sum;
        }
    });
    Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
}

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(xs, self.name(), softmax_fwd(xs, xl))
    }

    fn bwd(&self, _x: &Tensor, s: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(s.apply_op2(&g.contiguous()?, SoftmaxGrad)?))
    }
}

/// d x = s ⊙ (g − Σ s ⊙ g), from the forward's output `s`.
struct SoftmaxGrad;

fn softmax_grad<T: Real>(ss: &CpuStorage, sl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
    let (s, g) = (slice::<T>(ss, sl, "softmax grad")?, slice::<T>(gs, gl, "softmax grad")?);
    let d = last_dim(sl);
    let mut out = vec![T::from_f64(0.0); s.len()];
    par_rows(&mut out, d, |r, dx| {
        let (sr, gr) = (&s[r * d..(r + 1) * d], &g[r * d..(r + 1) * d]);
        let dot = sr.iter().zip(gr).fold(T::from_f64(0.0), |a, (&p, &q)| a + p * q);
        for i in 0..d {
            dx[i] = sr[i] * (gr[i] - dot);
        }
    });
    Ok((T::to_cpu_storage_owned(out), sl.shape().clone()))
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "fused-softmax-grad"
    }

    fn cpu_fwd(&self, ss: &CpuStorage, sl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(ss, self.name(), softmax_grad(ss, sl, gs, gl))
    }
}

// ---------------------------------------------------------------------------------------------
// GELU (erf)

/// x·Φ(x), Φ(x) = (1 + erf(x/√2))/2.
struct GeluOp;

fn gelu_fwd<T: Real>(xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
    let x = slice::<T>(xs, xl, "gelu")?;
    let (half, rsqrt2) = (T::from_f64(0.5), T::from_f64(std::f64::consts::FRAC_1_SQRT_2));
    let mut out = vec![T::from_f64(0.0); x.len()];
    // Elementwise: "rows" of one element.
    par_rows(&mut out, 1, |i, y| y[0] = x[i] * ((x[i] * rsqrt2).erf() * half + half));
    Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
}

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "fused-gelu-erf"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(xs, self.name(), gelu_fwd(xs, xl))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2(&g.contiguous()?, GeluGrad)?))
    }
}

/// d x = g·(Φ(x) + x·φ(x)), φ(x) = exp(−x²/2)/√(2π): the exact derivative (candle's own
/// `gelu_erf` backward truncates 1/√(2π) to 0.398942).
struct GeluGrad;

/// φ(x) = exp(−x²/2)/√(2π).
fn normal_pdf<T: Real>(x: T) -> T {
    (x * x * T::from_f64(-0.5)).exp()
        * T::from_f64(0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2)
}

/// gelu'(x) = Φ(x) + x·φ(x).
fn gelu_deriv<T: Real>(x: T) -> T {
    let half = T::from_f64(0.5);
    (x * T::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf() * half + half + x * normal_pdf(x)
}

fn gelu_grad<T: Real>(xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
    let (x, g) = (slice::<T>(xs, xl, "gelu grad")?, slice::<T>(gs, gl, "gelu grad")?);
    let mut out = vec![T::from_f64(0.0); x.len()];
    par_rows(&mut out, 1, |i, dx| dx[0] = g[i] * gelu_deriv(x[i]));
    Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
}

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "fused-gelu-erf-grad"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(xs, self.name(), gelu_grad(xs, xl, gs, gl))
    }
}

/// gelu'(x) as a tensor, for the GELU JVP (dy = gelu'(x)·dx), which LEE-regularised training
/// differentiates once more: its backward is g·gelu''(x) = g·φ(x)·(2 − x²).
struct GeluDerivOp;

fn gelu_deriv_fwd<T: Real>(xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
    let x = slice::<T>(xs, xl, "gelu derivative")?;
    let mut out = vec![T::from_f64(0.0); x.len()];
    par_rows(&mut out, 1, |i, y| y[0] = gelu_deriv(x[i]));
    Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
}

impl CustomOp1 for GeluDerivOp {
    fn name(&self) -> &'static str {
        "fused-gelu-erf-derivative"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(xs, self.name(), gelu_deriv_fwd(xs, xl))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2(&g.contiguous()?, GeluSecond)?))
    }
}

/// d x = g·φ(x)·(2 − x²).
struct GeluSecond;

fn gelu_second<T: Real>(xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
    let (x, g) = (slice::<T>(xs, xl, "gelu second")?, slice::<T>(gs, gl, "gelu second")?);
    let mut out = vec![T::from_f64(0.0); x.len()];
    par_rows(&mut out, 1, |i, dx| {
        dx[0] = g[i] * normal_pdf(x[i]) * (T::from_f64(2.0) - x[i] * x[i]);
    });
    Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
}

impl CustomOp2 for GeluSecond {
    fn name(&self) -> &'static str {
        "fused-gelu-erf-second"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(xs, self.name(), gelu_second(xs, xl, gs, gl))
    }
}

// ---------------------------------------------------------------------------------------------
// Public API

/// Whether the fused kernel can run on this tensor (CPU, f32 / f64).
pub(super) fn fusable(x: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu) && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// LayerNorm over the last axis with affine `weight, bias: (D)`: `x: (..., D)` → `(..., D)`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if weight.dims() != [d] || bias.dims() != [d] {
        bail!(
            "layer_norm: weight {:?} and bias {:?} must both be ({d}) for input {:?}",
            weight.dims(),
            bias.dims(),
            x.dims()
        );
    }
    if !fusable(x) {
        return layer_norm_composed(x, weight, bias, eps);
    }
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, LayerNormOp { eps })
}

/// The same LayerNorm from differentiable candle ops (other devices and dtypes).
pub fn layer_norm_composed(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let xc = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let rstd = (xc.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    xc.broadcast_mul(&rstd)?.broadcast_mul(weight)?.broadcast_add(bias)
}

/// Softmax over the last axis: `x: (..., N)` → `(..., N)`.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    x.dim(D::Minus1)?;
    if !fusable(x) {
        return softmax_composed(x);
    }
    x.contiguous()?.apply_op1(SoftmaxOp)
}

/// The same softmax from differentiable candle ops (the max shift is a constant: detached).
pub fn softmax_composed(x: &Tensor) -> Result<Tensor> {
    let e = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Exact GELU x·Φ(x), elementwise, with the exact derivative.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !fusable(x) {
        return gelu_erf_composed(x);
    }
    x.contiguous()?.apply_op1(GeluOp)
}

/// gelu'(x) = Φ(x) + x·φ(x), elementwise, differentiable (the GELU JVP's factor).
pub fn gelu_erf_derivative(x: &Tensor) -> Result<Tensor> {
    if !fusable(x) {
        return gelu_erf_derivative_composed(x);
    }
    x.contiguous()?.apply_op1(GeluDerivOp)
}

/// The same derivative from differentiable candle ops.
pub fn gelu_erf_derivative_composed(x: &Tensor) -> Result<Tensor> {
    let cdf = (x * std::f64::consts::FRAC_1_SQRT_2)?.erf()?.affine(0.5, 0.5)?;
    let pdf = ((x.sqr()? * -0.5)?.exp()? * (0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2))?;
    cdf + (x * pdf)?
}

/// The same GELU from differentiable candle ops (candle's `erf` has an exact backward).
pub fn gelu_erf_composed(x: &Tensor) -> Result<Tensor> {
    x * (x * std::f64::consts::FRAC_1_SQRT_2)?.erf()?.affine(0.5, 0.5)?
}
