//! The portable forms of LayerNorm, softmax, attention and the linear layer — what CUDA, f16 / bf16 and the CPU
//! under `runtime.kernels = "portable"` run — lean by construction: each is ONE node of the
//! autograd graph that keeps its input and its output, and its backward recomputes the rest
//! from them (PyTorch's fused kernels keep the same, or less).
//!
//! Written from candle ops, the same LayerNorm is ~8 nodes and keeps ~6 activation-sized
//! intermediates for the backward (ViT-B/16 portable: 528 MB per training image against
//! PyTorch's 122). Here the forward runs on the detached input — through candle's own kernels
//! where they exist (`candle_nn::ops::layer_norm`, `softmax_last_dim`: CUDA and CPU kernels
//! without a backward) — so its intermediates are freed at once, and a `CustomOp` hands the
//! result to the graph with a backward written from candle ops, which run on any device. The
//! hand-over copies the output once (candle builds an op's result from storage it owns).
//!
//! Attention keeps only `qkv` and its output: the backward recomputes the scores and their
//! softmax per call (as flash attention does), so no `(B·H, N, N)` tensor outlives the forward.
//!
//! Each backward computes on detached operands: its arguments are graph nodes, and candle
//! would otherwise record the backward's own ops and keep their intermediates alive through the
//! gradients it stores (a weight's gradient until the optimiser step): measured, that doubled
//! the training step's memory. Second derivatives through these backwards are not taken (LEE-penalised training
//! differentiates the JVP, whose own forms are composed): they would see detached tensors.

use super::attention::{attention_composed, merge_heads, split_heads};
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, D,
};
use std::sync::Mutex;

/// The output of a forward computed without a graph, handed to candle once as an op's result.
pub(super) struct Precomputed(Mutex<Option<Tensor>>);

impl Precomputed {
    pub(super) fn new(t: Tensor) -> Self {
        Precomputed(Mutex::new(Some(t)))
    }

    fn take(&self, op: &str) -> Result<Tensor> {
        match self.0.lock().ok().and_then(|mut s| s.take()) {
            Some(t) => Ok(t),
            None => bail!("{op}: the precomputed output was already used"),
        }
    }

    pub(super) fn cpu(&self, op: &str) -> Result<(CpuStorage, Shape)> {
        let t = self.take(op)?;
        let (s, l) = t.storage_and_layout();
        let Storage::Cpu(c) = &*s else {
            bail!("{op}: the precomputed output is not on the CPU")
        };
        Ok((cpu_copy(c, l, op)?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    pub(super) fn cuda(&self, op: &str) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let t = self.take(op)?;
        let (s, l) = t.storage_and_layout();
        let Storage::Cuda(c) = &*s else {
            bail!("{op}: the precomputed output is not on the GPU")
        };
        Ok((c.try_clone(l)?, l.shape().clone()))
    }
}

/// The elements of a contiguous layout of `c`, as storage of their own.
fn cpu_copy(c: &CpuStorage, l: &Layout, op: &str) -> Result<CpuStorage> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{op}: the precomputed output is not contiguous")
    };
    Ok(match c {
        CpuStorage::F32(v) => CpuStorage::F32(v[a..b].to_vec()),
        CpuStorage::F64(v) => CpuStorage::F64(v[a..b].to_vec()),
        CpuStorage::BF16(v) => CpuStorage::BF16(v[a..b].to_vec()),
        CpuStorage::F16(v) => CpuStorage::F16(v[a..b].to_vec()),
        other => bail!(
            "{op}: unsupported dtype {:?}",
            candle_core::backend::BackendStorage::dtype(other)
        ),
    })
}

/// The forward of a lean op: hand over the precomputed output, on the CPU or the GPU.
macro_rules! hand_over {
    (@fwd $tr:ident, $($s:ident),*) => {
        fn cpu_fwd(&self, $($s: &CpuStorage, _: &Layout),*) -> Result<(CpuStorage, Shape)> {
            let _ = ($($s,)*);
            self.out.cpu(<Self as $tr>::name(self))
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(&self, $($s: &candle_core::CudaStorage, _: &Layout),*) -> Result<(candle_core::CudaStorage, Shape)> {
            let _ = ($($s,)*);
            self.out.cuda(<Self as $tr>::name(self))
        }
    };
    (CustomOp1) => { hand_over!(@fwd CustomOp1, a); };
    (CustomOp2) => { hand_over!(@fwd CustomOp2, a, b); };
    (CustomOp3) => { hand_over!(@fwd CustomOp3, a, b, c); };
}
pub(super) use hand_over;

/// The forward `f(x)` without a graph; when `x` (or `also`) tracks one, `make(output)` is the
/// custom op that attaches the output to it.
fn lean<Op>(
    x: &Tensor,
    also: &[&Tensor],
    f: impl Fn(&Tensor) -> Result<Tensor>,
    make: impl FnOnce(Tensor) -> Op,
) -> Result<(Tensor, Option<Op>)> {
    if !x.track_op() && also.iter().all(|t| !t.track_op()) {
        return Ok((f(x)?, None));
    }
    let y = f(&x.detach())?.contiguous()?;
    Ok((y.clone(), Some(make(y))))
}

// ---------------------------------------------------------------------------------------------
// LayerNorm

struct LayerNorm {
    eps: f64,
    out: Precomputed,
}

/// The dtype reductions run in: f32 for the half-precision types, else the dtype itself.
pub fn at_least_f32(d: DType) -> DType {
    match d {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// x̂ = (x − mean)·rstd over the last axis, and rstd `(…, 1)`, in f32 at least.
fn normalized(x: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let x = x.to_dtype(at_least_f32(x.dtype()))?;
    let xc = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let rstd = (xc.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    Ok((xc.broadcast_mul(&rstd)?, rstd))
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "lean-layer-norm"
    }

    hand_over!(CustomOp3);

    /// dx = rstd·(gw − mean(gw) − x̂·mean(gw·x̂)) with gw = g·w; dw = Σ g·x̂; db = Σ g.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, w) = (&x.detach(), &w.detach());
        let (xhat, rstd) = normalized(x, self.eps)?;
        let g32 = g.to_dtype(xhat.dtype())?;
        let gw = g32.broadcast_mul(&w.to_dtype(xhat.dtype())?)?;
        let proj = (&gw * &xhat)?.mean_keepdim(D::Minus1)?;
        let dx = gw
            .broadcast_sub(&gw.mean_keepdim(D::Minus1)?)?
            .sub(&xhat.broadcast_mul(&proj)?)?
            .broadcast_mul(&rstd)?;
        let rows = |t: Tensor| t.flatten_to(D::Minus2).and_then(|t| t.sum(0));
        let dw = rows((&g32 * &xhat)?)?;
        let db = rows(g32)?;
        Ok((
            Some(dx.to_dtype(x.dtype())?),
            Some(dw.to_dtype(w.dtype())?),
            Some(db.to_dtype(w.dtype())?),
        ))
    }
}

/// LayerNorm over the last axis (weights checked by the caller), forward by candle-nn's kernel
/// (CPU and CUDA; f32, f16, bf16).
pub(super) fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let (w, b) = (weight.detach(), bias.detach());
    // candle-nn's kernel has no f64 on the CPU; the same formula from candle ops there.
    let f = |x: &Tensor| match x.dtype() {
        DType::F64 => normalized(x, eps)?.0.broadcast_mul(&w)?.broadcast_add(&b),
        _ => candle_nn::ops::layer_norm(x, &w, &b, eps as f32),
    };
    match lean(x, &[weight, bias], f, |y| LayerNorm {
        eps,
        out: Precomputed::new(y),
    })? {
        (y, None) => Ok(y),
        (_, Some(op)) => x.apply_op3(weight, bias, op),
    }
}

// ---------------------------------------------------------------------------------------------
// Linear

/// `x·Wᵀ [+ b]`: one node keeping x and W. Composed, the bias add's node would also keep the
/// product before the bias (candle's nodes keep their inputs whether the backward needs them or
/// not): one more output-sized tensor per layer.
pub(super) struct Linear {
    out: Precomputed,
}

impl Linear {
    /// dx = g·W, dW = gᵀ·x, db = Σ g over the rows.
    pub(super) fn grads(x: &Tensor, w: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (out_dim, in_dim) = w.dims2()?;
        let rows = x.elem_count() / in_dim;
        let (x2, g2) = (x.reshape((rows, in_dim))?, g.reshape((rows, out_dim))?);
        let dx = g2.matmul(w)?.reshape(x.dims())?;
        let dw = g2.t()?.matmul(&x2)?;
        Ok((dx, dw, g2.sum(0)?))
    }
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "lean-linear"
    }

    hand_over!(CustomOp2);

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = Linear::grads(&x.detach(), &w.detach(), g)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "lean-linear-bias"
    }

    hand_over!(CustomOp3);

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = Linear::grads(&x.detach(), &w.detach(), g)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `x·Wᵀ [+ b]` on the last axis (shapes checked by the caller), forward by `composed` on
/// detached operands.
pub(super) fn linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    composed: impl Fn(&Tensor, &Tensor, Option<&Tensor>) -> Result<Tensor>,
) -> Result<Tensor> {
    let (w, b) = (weight.detach(), bias.map(Tensor::detach));
    let f = |x: &Tensor| composed(x, &w, b.as_ref());
    let also: Vec<&Tensor> = [weight].into_iter().chain(bias).collect();
    match (
        lean(x, &also, f, |y| Linear {
            out: Precomputed::new(y),
        })?,
        bias,
    ) {
        ((y, None), _) => Ok(y),
        ((_, Some(op)), Some(b)) => x.apply_op3(weight, b, op),
        ((_, Some(op)), None) => x.apply_op2(weight, op),
    }
}

// ---------------------------------------------------------------------------------------------
// Linear + residual

/// The gradients `(dx, dW, db)` of `x·Wᵀ + b` for an incoming gradient `g` (detached operands).
pub(super) type LinearGrads = fn(&Tensor, &Tensor, &Tensor) -> Result<(Tensor, Tensor, Tensor)>;

/// `x·Wᵀ + b + r` (a block's output projection onto its residual stream) as one node over
/// `(x, [W | b], r)`. Two nodes (the linear, then candle's add) keep the linear's output alive
/// for the add's backward, which never reads it: one activation-sized tensor per residual add.
/// Here the node keeps x and r, which the graph holds anyway, and `[W | b]`, a weight-sized copy
/// per step (per layer, not per image).
struct LinearResidual {
    in_dim: usize,
    grads: LinearGrads,
    /// Whether the layer's input is GELU of the kept `x` (see [`linear_residual`]).
    gelu_first: bool,
    out: Precomputed,
}

impl CustomOp3 for LinearResidual {
    fn name(&self) -> &'static str {
        "lean-linear-residual"
    }

    hand_over!(CustomOp3);

    fn bwd(
        &self,
        x: &Tensor,
        wb: &Tensor,
        _r: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let w = wb.detach().narrow(1, 0, self.in_dim)?.contiguous()?;
        let x = x.detach();
        let (dx, dw, db) = match self.gelu_first {
            false => (self.grads)(&x, &w, g)?,
            true => self.gelu_grads(&x, &w, &g.contiguous()?)?,
        };
        let dwb = Tensor::cat(&[&dw, &db.unsqueeze(1)?], 1)?;
        Ok((Some(dx), Some(dwb), Some(g.clone())))
    }
}

impl LinearResidual {
    /// The gradients with the layer's input `gelu(x)`, recomputed in chunks of at least
    /// [`BWD_CHUNK_IMAGES`] images and [`BWD_CHUNK_ROWS`] rows: `dx = (g·W) ⊙ gelu'(x)`,
    /// `dW = Σ gᵀ·gelu(x)`, `db = Σ g`.
    fn gelu_grads(&self, x: &Tensor, w: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let b = x.dim(0)?;
        let rows_per_image = (x.elem_count() / b.max(1) / x.dim(D::Minus1)?.max(1)).max(1);
        let chunk = BWD_CHUNK_IMAGES.max(BWD_CHUNK_ROWS / rows_per_image);
        let mut dxs = Vec::with_capacity(b.div_ceil(chunk));
        let mut sums: Option<(Tensor, Tensor)> = None;
        for start in (0..b).step_by(chunk) {
            let len = chunk.min(b - start);
            let xc = x.narrow(0, start, len)?;
            let (da, dw, db) = (self.grads)(&super::gelu::gelu_erf(&xc)?, w, &g.narrow(0, start, len)?)?;
            dxs.push(super::gelu::gelu_backward(&xc, &da)?);
            // Summed in f32 at least: a bf16 sum would round once per chunk.
            let acc = at_least_f32(dw.dtype());
            let (dw, db) = (dw.to_dtype(acc)?, db.to_dtype(acc)?);
            sums = Some(match sums {
                None => (dw, db),
                Some((sw, sb)) => ((sw + dw)?, (sb + db)?),
            });
        }
        let Some((dw, db)) = sums else {
            bail!("lean-linear-residual: an empty batch has no gradient")
        };
        Ok((Tensor::cat(&dxs, 0)?, dw.to_dtype(w.dtype())?, db.to_dtype(w.dtype())?))
    }
}

/// `x·Wᵀ + b + residual` — or, with `gelu_first`, `gelu(x)·Wᵀ + b + residual` (a transformer
/// MLP's second layer: its input, four activations wide in a ViT, is then recomputed by the
/// backward rather than kept) — where a gradient is wanted (shapes checked by the caller).
/// `forward` computes it on detached operands, `grads` differentiates the linear part.
pub(super) fn linear_residual(
    x: &Tensor,
    (weight, bias): (&Tensor, &Tensor),
    residual: &Tensor,
    gelu_first: bool,
    forward: impl Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    grads: LinearGrads,
) -> Result<Tensor> {
    let (w, b, r) = (weight.detach(), bias.detach(), residual.detach());
    let y = forward(&x.detach(), &w, &b, &r)?.contiguous()?;
    let wb = Tensor::cat(&[weight, &bias.unsqueeze(1)?], 1)?;
    let op = LinearResidual {
        in_dim: weight.dim(1)?,
        grads,
        gelu_first,
        out: Precomputed::new(y),
    };
    x.apply_op3(&wb, residual, op)
}

// ---------------------------------------------------------------------------------------------
// Softmax

struct Softmax {
    out: Precomputed,
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "lean-softmax"
    }

    hand_over!(CustomOp1);

    /// dx = y ⊙ (g − Σ g ⊙ y): the output alone.
    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let y = &y.detach();
        let dot = (g * y)?.sum_keepdim(D::Minus1)?;
        Ok(Some((y * g.broadcast_sub(&dot)?)?))
    }
}

/// Softmax over the last axis, forward by candle-nn's kernel.
pub(super) fn softmax(x: &Tensor) -> Result<Tensor> {
    match lean(x, &[], candle_nn::ops::softmax_last_dim, |y| Softmax {
        out: Precomputed::new(y),
    })? {
        (y, None) => Ok(y),
        (_, Some(op)) => x.apply_op1(op),
    }
}

// ---------------------------------------------------------------------------------------------
// GELU

struct Gelu {
    out: Precomputed,
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "lean-gelu"
    }

    hand_over!(CustomOp1);

    /// dx = gelu'(x) · g, in chunks of images: candle's own GELU backward holds about eight
    /// activation-sized temporaries at once (ViT-B/16's MLP: 2.4 MB per image each).
    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (x, g) = (x.detach(), g.detach());
        let b = x.dim(0)?;
        let mut parts = Vec::with_capacity(b.div_ceil(BWD_CHUNK_IMAGES));
        for start in (0..b).step_by(BWD_CHUNK_IMAGES) {
            let len = BWD_CHUNK_IMAGES.min(b - start);
            parts.push(super::gelu::gelu_backward(
                &x.narrow(0, start, len)?,
                &g.narrow(0, start, len)?,
            )?);
        }
        Ok(Some(Tensor::cat(&parts, 0)?))
    }
}

/// The exact (erf) GELU by candle's kernel, as one node that keeps its input.
pub(super) fn gelu(x: &Tensor) -> Result<Tensor> {
    match lean(
        x,
        &[],
        |x| x.gelu_erf(),
        |y| Gelu {
            out: Precomputed::new(y),
        },
    )? {
        (y, None) => Ok(y),
        (_, Some(op)) => x.apply_op1(op),
    }
}

// ---------------------------------------------------------------------------------------------
// Attention

struct Attention {
    heads: usize,
    scale: f64,
    out: Precomputed,
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "lean-attention"
    }

    hand_over!(CustomOp1);

    /// With s = softmax(q·kᵀ) (q pre-scaled) recomputed: dv = sᵀ·g, ds = g·vᵀ,
    /// dz = s ⊙ (ds − Σ ds ⊙ s), dq = scale·dz·k, dk = dzᵀ·q (q scaled). In chunks of
    /// [`BWD_CHUNK_IMAGES`] images, so that the (N, N) temporaries of the backward (five
    /// of them at its peak) do not grow with the batch.
    fn bwd(&self, qkv: &Tensor, _o: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let qkv = &qkv.detach();
        let (b, n, d3) = qkv.dims3()?;
        let hd = d3 / 3 / self.heads;
        let mut parts = Vec::with_capacity(b.div_ceil(BWD_CHUNK_IMAGES));
        for start in (0..b).step_by(BWD_CHUNK_IMAGES) {
            let len = BWD_CHUNK_IMAGES.min(b - start);
            let (q, k, v) = split_heads(&qkv.narrow(0, start, len)?, self.heads, self.scale)?;
            let s = candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?)?;
            // g: (B, N, D) → (B·H, N, hd), as merge_heads undoes.
            let g = g
                .narrow(0, start, len)?
                .reshape((len, n, self.heads, hd))?
                .transpose(1, 2)?
                .reshape((len * self.heads, n, hd))?;
            let dv = s.t()?.matmul(&g)?;
            let ds = g.matmul(&v.t()?)?;
            let dz = (&s * ds.broadcast_sub(&(&ds * &s)?.sum_keepdim(D::Minus1)?)?)?;
            let dq = (dz.matmul(&k)? * self.scale)?;
            let dk = dz.t()?.matmul(&q)?;
            let [dq, dk, dv] = [dq, dk, dv].map(|t| merge_heads(&t, self.heads));
            parts.push(Tensor::cat(&[dq?, dk?, dv?], D::Minus1)?);
        }
        Ok(Some(Tensor::cat(&parts, 0)?))
    }
}

/// Images per chunk of the attention and GELU backwards: their temporaries (attention's
/// (B·H, N, N) scores, GELU's derivative terms) are bounded by this many images', not the batch's.
const BWD_CHUNK_IMAGES: usize = 8;

/// Rows (images × tokens) at least per chunk of the MLP's backward ([`LinearResidual`]): with
/// few tokens per image, chunks of 8 images made gemm calls too small (the tiny ViT's 17
/// tokens: 136 rows; its training step was 1.5× slower). ViT-B/16 (197 tokens): 10 images.
const BWD_CHUNK_ROWS: usize = 2048;

/// softmax(scale·q·kᵀ)·v on the packed `qkv: (B, N, 3D)` (checked by the caller) → `(B, N, D)`.
pub(super) fn attention(qkv: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let f = |qkv: &Tensor| attention_composed(qkv, heads, scale);
    match lean(qkv, &[], f, |y| Attention {
        heads,
        scale,
        out: Precomputed::new(y),
    })? {
        (y, None) => Ok(y),
        (_, Some(op)) => qkv.apply_op1(op),
    }
}
