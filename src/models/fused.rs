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
    [0.14031620479873938, 0.13886065869932185, -0.002169697709150084, -0.0007006315703679683, 1.6773778169443254e-05, 3.179330004765557e-06, -8.578622678889758e-08, -1.1375100861243936e-08],
    [0.4041169094296134, 0.12254410119323084, -0.005744254576731916, -0.00045874256607791875, 4.06689384482295e-05, 1.3877963636055313e-06, -1.8980588256667374e-07, -2.6011193199337868e-09],
    [0.6232408821853153, 0.09543744197028615, -0.007456050054620085, -0.00010873407147671266, 4.3080522342919814e-05, -8.365572452539993e-07, -1.5692285493251745e-07, 6.57887966326598e-09],
    [0.7840750610607065, 0.06559313066145754, -0.00717424869318049, 0.00018149140366063854, 2.744070268756449e-05, -2.0512355534130222e-06, -3.976775864167337e-08, 8.818723529202543e-09],
    [0.8883882317044999, 0.03978424481261769, -0.00559465951612198, 0.00031728971217726, 6.8298652107223745e-06, -1.87144689922647e-06, 5.8552281245738413e-08, 4.5754973143630195e-09],
    [0.9481700727840701, 0.02129497171084832, -0.0036600733261684185, 0.0003084720866218804, -7.446121310927811e-06, -9.340348761099904e-07, 8.40312707195423e-08, -6.532587804031209e-10],
    [0.9784437332402577, 0.010059032377732008, -0.002043240960503266, 0.00022429808786783578, -1.2138350612631021e-05, -6.516584072358e-08, 5.491838064863863e-08, -2.9279050295372144e-09],
    [0.9919900576694599, 0.004193228553005898, -0.0009827879209849, 0.00013172088458690556, -1.0317459632092074e-05, 3.498068914531416e-07, 1.5829566768488235e-08, -2.344620497751748e-09],
    [0.9973459706398757, 0.001542602576808022, -0.00040975378890927873, 6.45261814721243e-05, -6.4358519166508865e-06, 3.813345372805088e-07, -6.783555696332488e-09, -8.956178021435335e-10],
    [0.9992170617818318, 0.0005008097327282024, -0.00014867788052623659, 2.6817447625115953e-05, -3.2063953306626924e-06, 2.550505247000956e-07, -1.1808316047190459e-08, 5.375966338760918e-11],
    [0.9997946242638419, 0.00014348439074460262, -4.708081516565492e-05, 9.551613616376464e-06, -1.3218517955111697e-06, 1.287209232536668e-07, -8.566681038157942e-09, 3.2238745006907266e-10],
    [0.9999521451603192, 3.627853535878578e-05, -1.3037600655322214e-05, 2.93464060530102e-06, -4.594040320725183e-07, 5.2284802265489816e-08, -4.365128754117709e-09, 2.517950292713067e-10],
    [0.9999901032654268, 8.094835402455702e-06, -3.1620467414214772e-06, 7.812886894109639e-07, -1.3611815643544827e-07, 1.760722412313953e-08, -1.7387086435736608e-09, 1.2745005051328917e-10],
    [0.9999981847185986, 1.593967598162438e-06, -6.724559064177452e-07, 1.8082612129877162e-07, -3.4636519259760093e-08, 4.997776414938926e-09, -5.650654415983536e-10, 4.9048765049519716e-11],
    [0.9999997048598172, 2.7699003499193076e-07, -1.255114170761376e-07, 3.6472176834223546e-08, -7.607999248410247e-09, 1.2081682321252174e-09, -1.5320625062296148e-10, 1.517719283583574e-11],
    [0.9999999574860589, 4.2477797973505815e-08, -2.0575277036865094e-08, 6.422834819552747e-09, -1.4479124515469106e-09, 2.504867424590884e-10, -3.512420321234916e-11, 3.879563337250147e-12],
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

/// An elementwise kernel `f(x)` over one contiguous operand, in parallel blocks of
/// `MIN_TASK_ELEMS` (each block a plain loop over slices, which the compiler can vectorise).
fn map1<T: Real>(xs: &CpuStorage, xl: &Layout, op: &str, f: impl Fn(T) -> T + Sync) -> Result<(CpuStorage, Shape)> {
    let x = slice::<T>(xs, xl, op)?;
    let mut out = vec![T::from_f64(0.0); x.len()];
    par_rows(&mut out, MIN_TASK_ELEMS, |r, y| {
        let x = &x[r * MIN_TASK_ELEMS..r * MIN_TASK_ELEMS + y.len()];
        y.iter_mut().zip(x).for_each(|(y, &x)| *y = f(x));
    });
    Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
}

/// [`map1`] for kernels `f(x, g)` of an operand and an incoming gradient of the same shape.
fn map2<T: Real>(
    xs: &CpuStorage,
    xl: &Layout,
    gs: &CpuStorage,
    gl: &Layout,
    op: &str,
    f: impl Fn(T, T) -> T + Sync,
) -> Result<(CpuStorage, Shape)> {
    let (x, g) = (slice::<T>(xs, xl, op)?, slice::<T>(gs, gl, op)?);
    let mut out = vec![T::from_f64(0.0); x.len()];
    par_rows(&mut out, MIN_TASK_ELEMS, |r, y| {
        let at = r * MIN_TASK_ELEMS..r * MIN_TASK_ELEMS + y.len();
        y.iter_mut()
            .zip(&x[at.clone()])
            .zip(&g[at])
            .for_each(|((y, &x), &g)| *y = f(x, g));
    });
    Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
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

/// Σ f(i) for i in 0..n, in eight interleaved partial sums. A single running sum is one chain of
/// n dependent adds (4 cycles each, never vectorised: float addition does not reassociate); eight
/// independent chains fill one SIMD register. Aimed at the LayerNorm row statistics: with one
/// running sum they were 26% of a one-thread small-ViT training step under perf.
#[inline(always)]
pub(super) fn lane_sum<T: Real>(n: usize, f: impl Fn(usize) -> T) -> T {
    const LANES: usize = 8;
    let zero = T::from_f64(0.0);
    let mut acc = [zero; LANES];
    let full = n - n % LANES;
    for base in (0..full).step_by(LANES) {
        for (k, a) in acc.iter_mut().enumerate() {
            *a += f(base + k);
        }
    }
    let tail = (full..n).fold(zero, |a, i| a + f(i));
    let [a0, a1, a2, a3, a4, a5, a6, a7] = acc;
    ((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7)) + tail
}

/// Mean and 1/σ of one row (biased variance, as PyTorch), accumulated in the element type.
fn moments<T: Real>(x: &[T], eps: T) -> (T, T) {
    let n = T::from_f64(x.len() as f64);
    let mean = lane_sum(x.len(), |i| x[i]) / n;
    let var = lane_sum(x.len(), |i| (x[i] - mean) * (x[i] - mean)) / n;
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
        let sg = lane_sum(d, |i| gr[i] * w[i]);
        let sgx = lane_sum(d, |i| gr[i] * w[i] * (xr[i] - mean) * rstd);
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
        let dot = lane_sum(d, |i| sr[i] * gr[i]);
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
    let (half, rsqrt2) = (T::from_f64(0.5), T::from_f64(std::f64::consts::FRAC_1_SQRT_2));
    map1(xs, xl, "gelu", |x: T| x * ((x * rsqrt2).erf() * half + half))
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
    map2(xs, xl, gs, gl, "gelu grad", |x: T, g| g * gelu_deriv(x))
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
    map1(xs, xl, "gelu derivative", gelu_deriv::<T>)
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
    map2(xs, xl, gs, gl, "gelu second", |x: T, g| {
        g * normal_pdf(x) * (T::from_f64(2.0) - x * x)
    })
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
