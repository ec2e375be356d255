//! Our Vision Transformer (Dosovitskiy et al. 2021), laid out as timm's `VisionTransformer` so that
//! timm / MAE checkpoints load by name: patch embedding (patchify + matmul), cls token, learned or
//! fixed 2-D sin-cos position embedding (MAE's `get_2d_sincos_pos_embed`), pre-norm blocks with
//! drop path, and cls pooling (`norm`) or mean pooling of the patch tokens (`fc_norm`), then `head`.
//! timm's options: no class token, register tokens (`reg_token`), DeiT's distillation token and
//! head (`dist_token`, `head_dist`), `no_embed_class`, `norm_pre` (CLIP) and layer scale
//! (`ls1` / `ls2`).
//!
//! The JVP names every operation as a step of the layerwise decomposition (paper Eq. 6), including
//! the cls concat, position-embedding add and pooling that the reference code leaves out, so the
//! steps' contributions sum exactly to the end-to-end Lie derivative.

use crate::config::{Pool, PosEmbed, VitConfig};
use crate::jvp::{add_tangents, Jvp, Repr, StepKind, Tape};
use crate::kernels::checkpoint::checkpoint;
use crate::models::layers::{
    attention, layer_norm, linear, mlp, patch_embed, zero_tangent, Attention, DropPath, LayerNorm, Linear, Mlp,
    PatchEmbed, ResidualBranch,
};
use crate::models::{Model, Readout, ReadoutJvp, Rng};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Init, VarBuilder};

impl VitConfig {
    /// ViT-Tiny for 28×28 digits: 4×4 patches of 7 px, width 64, depth 4, 2 heads.
    pub fn tiny_mnist() -> Self {
        Self {
            patch_size: 7,
            dim: 64,
            depth: 4,
            heads: 2,
            ..Self::default()
        }
    }

    /// ViT-Small-ish for 28×28 digits: 7×7 patches of 4 px, width 192, depth 6, 3 heads.
    pub fn small_mnist() -> Self {
        Self {
            patch_size: 4,
            dim: 192,
            depth: 6,
            heads: 3,
            ..Self::default()
        }
    }
}

/// MAE's `get_2d_sincos_pos_embed(dim, grid, cls_token=True)` for an `h×w` grid: `(1 + h·w, dim)`
/// row-major, cls row zero. Token (i, j) gets sin/cos of the column j in its first half and of
/// the row i in its second half (MAE meshes `grid_w` first). `dim` must be a multiple of 4.
pub fn sincos_pos_embed(dim: usize, h: usize, w: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    if !dim.is_multiple_of(4) {
        candle_core::bail!("sin-cos position embedding needs a width divisible by 4, got {dim}");
    }
    let quarter = dim / 4;
    // omega_k = 1 / 10000^(k / (dim/4)), as get_1d_sincos_pos_embed_from_grid with embed_dim = dim/2
    let omega: Vec<f64> = (0..quarter)
        .map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64))
        .collect();
    let one_d = |pos: f64, out: &mut Vec<f64>| {
        out.extend(omega.iter().map(|o| (pos * o).sin()));
        out.extend(omega.iter().map(|o| (pos * o).cos()));
    };
    let mut data = vec![0.0; dim];
    for i in 0..h {
        for j in 0..w {
            one_d(j as f64, &mut data);
            one_d(i as f64, &mut data);
        }
    }
    Tensor::from_vec(data, (1, 1 + h * w, dim), device)?.to_dtype(dtype)
}

/// The position embedding `(1, prefix + h·w, dim)` with `prefix` slots for the class /
/// distillation / register tokens (1 in MAE's layout, 0 with `no_embed_class`): a trainable
/// `pos_embed` for `"learned"`, a fixed sin-cos buffer (not in the VarMap; zero prefix slots) for
/// `"sincos"`.
pub(crate) fn pos_embed(
    kind: PosEmbed,
    dim: usize,
    grid: (usize, usize),
    prefix: usize,
    vb: &VarBuilder,
) -> Result<Tensor> {
    let n = prefix + grid.0 * grid.1;
    match kind {
        PosEmbed::Learned => vb.get_with_hints((1, n, dim), "pos_embed", Init::Randn { mean: 0.0, stdev: 0.02 }),
        PosEmbed::Sincos => {
            let patches = sincos_pos_embed(dim, grid.0, grid.1, vb.dtype(), vb.device())?.narrow(1, 1, n - prefix)?;
            let zeros = Tensor::zeros((1, prefix, dim), vb.dtype(), vb.device())?;
            Tensor::cat(&[&zeros, &patches], 1)
        }
    }
}

/// Cubic convolution weights (Keys, A = −0.75, as PyTorch's bicubic) for the 4 taps around a
/// sample at fractional offset `t` ∈ [0, 1).
fn cubic_weights(t: f64) -> [f64; 4] {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0; // |x| ≤ 1
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A; // 1 < |x| < 2
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// 1-D bicubic resampling matrix `(out, in)`, align_corners=False, border taps clamped
/// (PyTorch's `upsample_bicubic2d`).
fn bicubic_matrix(n_in: usize, n_out: usize) -> Vec<Vec<f64>> {
    let scale = n_in as f64 / n_out as f64;
    (0..n_out)
        .map(|o| {
            let src = (o as f64 + 0.5) * scale - 0.5;
            let i0 = src.floor();
            let w = cubic_weights(src - i0);
            let mut row = vec![0.0; n_in];
            for (k, wk) in w.iter().enumerate() {
                let idx = (i0 as i64 - 1 + k as i64).clamp(0, n_in as i64 - 1) as usize;
                row[idx] += wk;
            }
            row
        })
        .collect()
}

/// Resample a position embedding `(1, 1 + h·w, D)` from the `old` (h, w) token grid to `new`,
/// bicubic with align_corners=False, the cls slot unchanged: timm / MAE `interpolate_pos_embed`.
pub fn interpolate_pos_embed(pos: &Tensor, old: (usize, usize), new: (usize, usize)) -> Result<Tensor> {
    let (one, n, d) = pos.dims3()?;
    if one != 1 || n != 1 + old.0 * old.1 {
        candle_core::bail!(
            "interpolate_pos_embed: a (1, 1 + {}·{}, D) embedding was expected, got {:?}",
            old.0,
            old.1,
            pos.dims()
        );
    }
    let rows = bicubic_matrix(old.0, new.0); // (new.h, old.h)
    let cols = bicubic_matrix(old.1, new.1); // (new.w, old.w)
    let src: Vec<Vec<f64>> = pos.get(0)?.to_dtype(DType::F64)?.to_vec2()?;
    let mut out = src[0].clone(); // cls slot
    for ri in &rows {
        for cj in &cols {
            let mut acc = vec![0.0; d];
            for (a, wa) in ri.iter().enumerate().filter(|(_, w)| **w != 0.0) {
                for (b, wb) in cj.iter().enumerate().filter(|(_, w)| **w != 0.0) {
                    let token = &src[1 + a * old.1 + b];
                    acc.iter_mut().zip(token).for_each(|(s, v)| *s += wa * wb * v);
                }
            }
            out.extend(acc);
        }
    }
    Tensor::from_vec(out, (1, 1 + new.0 * new.1, d), pos.device())?.to_dtype(pos.dtype())
}

/// A pre-norm transformer block (timm `Block`): x + attn(norm1(x)), then x + mlp(norm2(x)).
#[derive(Clone, Debug)]
pub struct Block {
    name: String,
    norm1: LayerNorm,
    attn: Attention,
    /// Layer scale of each branch (`ls1.gamma`, `ls2.gamma`), when `init_values` > 0.
    ls: Option<(Tensor, Tensor)>,
    norm2: LayerNorm,
    mlp: Mlp,
    drop_path: DropPath,
}

pub fn block(dim: usize, heads: usize, cfg: &VitConfig, drop_path: f64, vb: VarBuilder) -> Result<Block> {
    let hidden = (dim as f64 * cfg.mlp_ratio) as usize; // int(dim * mlp_ratio), as timm
    let gamma = |name: &str| vb.pp(name).get_with_hints(dim, "gamma", Init::Const(cfg.init_values));
    let ls = if cfg.init_values > 0.0 {
        Some((gamma("ls1")?, gamma("ls2")?))
    } else {
        None
    };
    Ok(Block {
        name: vb.prefix(),
        norm1: layer_norm(dim, cfg.ln_eps, vb.pp("norm1"))?,
        attn: attention(dim, heads, cfg.qkv_bias, vb.pp("attn"))?,
        ls,
        norm2: layer_norm(dim, cfg.ln_eps, vb.pp("norm2"))?,
        mlp: mlp(dim, hidden, vb.pp("mlp"))?,
        drop_path: DropPath { rate: drop_path },
    })
}

impl Block {
    /// `x: (B, N, D)`; `rng = None` is eval mode (no drop path).
    pub fn forward(&self, x: &Tensor, mut rng: Option<&mut Rng>) -> Result<Tensor> {
        if let Some((ls1, ls2)) = &self.ls {
            let h = self.attn.forward(&self.norm1.forward(x)?)?.broadcast_mul(ls1)?;
            let x = (x + self.drop_path.forward(&h, rng.as_deref_mut())?)?;
            let h = self.mlp.forward(&self.norm2.forward(&x)?)?.broadcast_mul(ls2)?;
            return &x + self.drop_path.forward(&h, rng)?;
        }
        // Without drop path the residual adds ride in the output projections (one op each where
        // nothing tracks a gradient).
        let direct = self.drop_path.is_identity(rng.is_some());
        let h = self.norm1.forward(x)?;
        let x = if direct {
            self.attn.forward_add(&h, x)?
        } else {
            (x + self.drop_path.forward(&self.attn.forward(&h)?, rng.as_deref_mut())?)?
        };
        let h = self.norm2.forward(&x)?;
        if direct {
            self.mlp.forward_add(&h, &x)
        } else {
            &x + self.drop_path.forward(&self.mlp.forward(&h)?, rng)?
        }
    }

    /// [`Block::forward`] as one gradient-checkpointed node when `checkpointed` (and `x` tracks a
    /// gradient): the block keeps only its input, and its backward reruns it with the same
    /// drop-path draws.
    pub fn forward_maybe_checkpointed(&self, x: &Tensor, rng: Option<&mut Rng>, checkpointed: bool) -> Result<Tensor> {
        if !checkpointed {
            return self.forward(x, rng);
        }
        let replay = rng.as_deref().cloned();
        let again = self.clone();
        checkpoint(
            x,
            |x| self.forward(x, rng),
            Box::new(move |x| again.forward(x, replay.clone().as_mut())),
        )
    }

    /// JVP recording one tape step per operation; `repr` is the token layout of `x`.
    pub fn jvp_steps(&self, x: &Tensor, dx: &Tensor, tape: &mut Tape, repr: Repr) -> Result<(Tensor, Tensor)> {
        let name = |s: &str| format!("{}.{s}", self.name);
        if !tape.is_layerwise() && self.ls.is_none() {
            // Nothing to record: the residual adds ride in the output projections, the same
            // values to the bit as the steps below.
            let (h, dh) = self.norm1.jvp(x, dx, tape)?;
            let (x, dx) = self.attn.jvp_add((&h, &dh), (x, dx), tape)?;
            let (h, dh) = self.norm2.jvp(&x, &dx, tape)?;
            return self.mlp.jvp_add((&h, &dh), (&x, &dx), tape);
        }
        let (h, dh) = self.norm1.jvp(x, dx, tape)?;
        let dh = tape.step(&name("norm1"), StepKind::Norm, repr, &h, dh)?;
        let (a, da) = self.attn.jvp(&h, &dh, tape)?;
        let da = tape.step(&name("attn"), StepKind::Attention, repr, &a, da)?;
        let (a, da) = self.scale(0, a, da, &name("ls1"), repr, tape)?;
        let x = (x + a)?;
        let dx = tape.step(
            &name("attn_residual"),
            StepKind::Residual,
            repr,
            &x,
            add_tangents(dx, &da)?,
        )?;

        let (h, dh) = self.norm2.jvp(&x, &dx, tape)?;
        let dh = tape.step(&name("norm2"), StepKind::Norm, repr, &h, dh)?;
        let (h, dh) = self.mlp.fc1.jvp(&h, &dh, tape)?;
        let dh = tape.step(&name("mlp.fc1"), StepKind::Linear, repr, &h, dh)?;
        let (h, dh) = self.mlp.act.jvp(&h, &dh, tape)?;
        let dh = tape.step(&name("mlp.act"), StepKind::Activation, repr, &h, dh)?;
        let (m, dm) = self.mlp.fc2.jvp(&h, &dh, tape)?;
        let dm = tape.step(&name("mlp.fc2"), StepKind::Linear, repr, &m, dm)?;
        let (m, dm) = self.scale(1, m, dm, &name("ls2"), repr, tape)?;
        let y = (x + m)?;
        let dy = tape.step(
            &name("mlp_residual"),
            StepKind::Residual,
            repr,
            &y,
            add_tangents(&dx, &dm)?,
        )?;
        Ok((y, dy))
    }
}

impl Block {
    /// Branch `i`'s layer scale (a step of its own), or the branch unchanged without one.
    fn scale(
        &self,
        i: usize,
        a: Tensor,
        da: Tensor,
        name: &str,
        repr: Repr,
        tape: &mut Tape,
    ) -> Result<(Tensor, Tensor)> {
        let Some(ls) = &self.ls else { return Ok((a, da)) };
        let g = if i == 0 { &ls.0 } else { &ls.1 };
        let y = a.broadcast_mul(g)?;
        let dy = tape.step(name, StepKind::Linear, repr, &y, da.broadcast_mul(g)?)?;
        Ok((y, dy))
    }
}

/// The transformer blocks with stochastic-depth rates rising linearly to `cfg.drop_path`.
pub(crate) fn blocks(cfg: &VitConfig, vb: VarBuilder) -> Result<Vec<Block>> {
    (0..cfg.depth)
        .map(|i| {
            let rate = if cfg.depth > 1 {
                cfg.drop_path * i as f64 / (cfg.depth - 1) as f64
            } else {
                0.0
            };
            block(cfg.dim, cfg.heads, cfg, rate, vb.pp("blocks").pp(i))
        })
        .collect()
}

/// Check that the patch tiles the image and return the token grid (h, w).
pub(crate) fn token_grid(image_size: usize, patch: usize) -> Result<(usize, usize)> {
    if patch == 0 || !image_size.is_multiple_of(patch) {
        candle_core::bail!("model.vit.patch_size = {patch} must divide the image size {image_size}");
    }
    Ok((image_size / patch, image_size / patch))
}

/// A ViT classifier: images `(B, C, H, W)` → logits `(B, K)`.
#[derive(Clone, Debug)]
pub struct Vit {
    patch_embed: PatchEmbed,
    /// The class, distillation and register tokens, in that order, each `(1, n, D)`.
    prefix: Vec<Tensor>,
    /// `(1, P + h·w, D)`, or `(1, h·w, D)` with `no_embed_class`.
    pos_embed: Tensor,
    no_embed_class: bool,
    norm_pre: Option<LayerNorm>,
    blocks: Vec<Block>,
    /// `norm` for cls pooling, `fc_norm` for mean pooling.
    norm: LayerNorm,
    pool: Pool,
    head: Linear,
    /// DeiT's distillation head, reading the distillation token.
    head_dist: Option<Linear>,
    grid: (usize, usize),
    /// Recompute each block in the backward instead of keeping its activations.
    grad_checkpointing: bool,
}

impl Vit {
    pub fn new(
        cfg: &VitConfig,
        image_size: usize,
        in_chans: usize,
        num_classes: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let grid = token_grid(image_size, cfg.patch_size)?;
        let pool = cfg.pool;
        let norm_name = match pool {
            Pool::Cls => "norm",
            Pool::Mean => "fc_norm",
        };
        let token =
            |name: &str, n: usize| vb.get_with_hints((1, n, cfg.dim), name, Init::Randn { mean: 0.0, stdev: 0.02 });
        let mut prefix = Vec::new();
        if cfg.class_token {
            prefix.push(token("cls_token", 1)?);
        }
        if cfg.distilled {
            prefix.push(token("dist_token", 1)?);
        }
        if cfg.reg_tokens > 0 {
            prefix.push(token("reg_token", cfg.reg_tokens)?);
        }
        let embedded = if cfg.no_embed_class { 0 } else { cfg.prefix_tokens() };
        Ok(Self {
            patch_embed: patch_embed(in_chans, cfg.dim, cfg.patch_size, !cfg.pre_norm, vb.pp("patch_embed"))?,
            prefix,
            pos_embed: pos_embed(cfg.pos_embed, cfg.dim, grid, embedded, &vb)?,
            no_embed_class: cfg.no_embed_class,
            norm_pre: cfg
                .pre_norm
                .then(|| layer_norm(cfg.dim, cfg.ln_eps, vb.pp("norm_pre")))
                .transpose()?,
            blocks: blocks(cfg, vb.clone())?,
            norm: layer_norm(cfg.dim, cfg.ln_eps, vb.pp(norm_name))?,
            pool,
            head: linear(cfg.dim, num_classes, true, vb.pp("head"))?,
            head_dist: cfg
                .distilled
                .then(|| linear(cfg.dim, num_classes, true, vb.pp("head_dist")))
                .transpose()?,
            grid,
            grad_checkpointing: false,
        })
    }

    /// The token grid (h, w) this model was built for.
    pub fn grid(&self) -> (usize, usize) {
        self.grid
    }

    /// Tokens before the patch tokens.
    fn n_prefix(&self) -> usize {
        self.prefix.iter().map(|t| t.dim(1).unwrap_or(0)).sum()
    }

    /// The position embedding is laid out for one token grid: say so instead of a shape error.
    fn check_grid(&self, n: usize) -> Result<()> {
        let (h, w) = self.grid;
        if n != h * w {
            candle_core::bail!(
                "this ViT was built for a {h}×{w} token grid but the input gives {n} patches; build it for the \
                 new image size and resample the position embedding with interpolate_pos_embed"
            );
        }
        Ok(())
    }

    /// The prefix tokens for a batch of `b`, `(B, P, D)` (none: `None`).
    fn prefix_tokens(&self, b: usize) -> Result<Option<Tensor>> {
        if self.prefix.is_empty() {
            return Ok(None);
        }
        let parts = self
            .prefix
            .iter()
            .map(|t| {
                let (_, n, d) = t.dims3()?;
                t.broadcast_as((b, n, d))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Tensor::cat(&parts, 1)?))
    }

    /// Patch tokens `(B, N, D)` → the blocks' input: position embedding and prefix tokens (in
    /// timm's order for `no_embed_class`), then `norm_pre`.
    fn embed(&self, t: &Tensor) -> Result<Tensor> {
        let (b, n, _) = t.dims3()?;
        self.check_grid(n)?;
        let with_prefix = |t: Tensor| -> Result<Tensor> {
            match self.prefix_tokens(b)? {
                Some(p) => Tensor::cat(&[&p, &t], 1),
                None => Ok(t),
            }
        };
        let t = if self.no_embed_class {
            with_prefix(t.broadcast_add(&self.pos_embed)?)?
        } else {
            with_prefix(t.clone())?.broadcast_add(&self.pos_embed)?
        };
        match &self.norm_pre {
            Some(norm) => norm.forward(&t),
            None => Ok(t),
        }
    }

    /// Tokens after the blocks, `(B, P + N, D)`; `rng = None` is eval mode.
    fn tokens(&self, x: &Tensor, mut rng: Option<&mut Rng>) -> Result<Tensor> {
        let mut t = self.embed(&self.patch_embed.forward(x)?)?;
        for blk in &self.blocks {
            t = blk.forward_maybe_checkpointed(&t, rng.as_deref_mut(), self.grad_checkpointing)?;
        }
        Ok(t)
    }

    /// `(B, P + N, D)` → what the head(s) read: `(B, D)`, or `(B, 2, D)` (class and
    /// distillation tokens) for a distilled ViT.
    fn pool(&self, t: &Tensor) -> Result<Tensor> {
        match self.pool {
            Pool::Cls if self.head_dist.is_some() => self.norm.forward(t)?.narrow(1, 0, 2),
            Pool::Cls => self.norm.forward(t)?.get_on_dim(1, 0),
            Pool::Mean => {
                let p = self.n_prefix();
                let n = t.dim(1)? - p;
                self.norm.forward(&t.narrow(1, p, n)?.mean(1)?)
            }
        }
    }

    /// The logits of pooled features; a distilled ViT averages its two heads (timm's eval mode).
    fn logits(&self, f: &Tensor) -> Result<Tensor> {
        match &self.head_dist {
            Some(hd) => (self.head.forward(&f.get_on_dim(1, 0)?)? + hd.forward(&f.get_on_dim(1, 1)?)?)? / 2.0,
            None => self.head.forward(f),
        }
    }
}

impl Jvp for Vit {
    fn jvp(&self, x: &Tensor, dx: &Tensor, tape: &mut Tape) -> Result<(Tensor, Tensor)> {
        let r = self.jvp_at(x, dx, tape, Readout::Logits)?;
        Ok((r.y, r.dy))
    }
}

impl Model for Vit {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.logits(&self.pool(&self.tokens(x, None)?)?)
    }

    fn forward_train(&self, x: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        self.logits(&self.pool(&self.tokens(x, Some(rng))?)?)
    }

    fn set_grad_checkpointing(&mut self, on: bool) -> Result<()> {
        self.grad_checkpointing = on;
        Ok(())
    }

    fn jvp_at(&self, x: &Tensor, dx: &Tensor, tape: &mut Tape, at: Readout) -> Result<ReadoutJvp> {
        let (h, w) = self.grid;
        let p = self.n_prefix();
        let tokens = Repr::Tokens { h, w, prefix: p };
        let patches = Repr::Tokens { h, w, prefix: 0 };
        let (y, dy) = self.patch_embed.jvp(x, dx, tape)?; // (B, N, D), (T, B, N, D)
        self.check_grid(y.dim(1)?)?;
        let mut dy = tape.step("patch_embed", StepKind::PatchEmbed, patches, &y, dy)?;
        let mut y = y;

        let b = y.dim(0)?;
        // The prefix tokens are constants: zero tangents.
        let prefix_step = |y: Tensor, dy: Tensor, tape: &mut Tape| -> Result<(Tensor, Tensor)> {
            let Some(pt) = self.prefix_tokens(b)? else {
                return Ok((y, dy));
            };
            let y = Tensor::cat(&[&pt, &y], 1)?;
            let dy = Tensor::cat(&[&zero_tangent(dy.dim(0)?, &pt)?, &dy], 2)?;
            let dy = tape.step("cls_token", StepKind::ClsToken, tokens, &y, dy)?;
            Ok((y, dy))
        };
        if self.no_embed_class {
            y = y.broadcast_add(&self.pos_embed)?;
            dy = tape.step("pos_embed", StepKind::PosEmbed, patches, &y, dy)?;
            (y, dy) = prefix_step(y, dy, tape)?;
        } else {
            (y, dy) = prefix_step(y, dy, tape)?;
            y = y.broadcast_add(&self.pos_embed)?;
            dy = tape.step("pos_embed", StepKind::PosEmbed, tokens, &y, dy)?;
        }
        if let Some(norm) = &self.norm_pre {
            let (z, dz) = norm.jvp(&y, &dy, tape)?;
            dy = tape.step("norm_pre", StepKind::Norm, tokens, &z, dz)?;
            y = z;
        }

        for blk in &self.blocks {
            (y, dy) = blk.jvp_steps(&y, &dy, tape, tokens)?;
        }
        if at == Readout::Tokens {
            let n = y.dim(1)? - p;
            let logits = self.logits(&self.pool(&y)?)?;
            return Ok(ReadoutJvp {
                logits,
                y: y.narrow(1, p, n)?,
                dy: dy.narrow(2, p, n)?,
            });
        }

        let (f, df) = match self.pool {
            Pool::Cls => {
                let (z, dz) = self.norm.jvp(&y, &dy, tape)?;
                let dz = tape.step("norm", StepKind::Norm, tokens, &z, dz)?;
                // The class token, or the class and distillation tokens (B, 2, D).
                let (f, df) = if self.head_dist.is_some() {
                    (z.narrow(1, 0, 2)?, dz.narrow(2, 0, 2)?)
                } else {
                    (z.get_on_dim(1, 0)?, dz.get_on_dim(2, 0)?)
                };
                let df = tape.step("pool", StepKind::Pool, Repr::Invariant, &f, df)?;
                (f, df)
            }
            Pool::Mean => {
                let n = y.dim(1)? - p;
                let m = y.narrow(1, p, n)?.mean(1)?;
                let dm = tape.step(
                    "pool",
                    StepKind::Pool,
                    Repr::Invariant,
                    &m,
                    dy.narrow(2, p, n)?.mean(2)?,
                )?;
                let (f, df) = self.norm.jvp(&m, &dm, tape)?;
                let df = tape.step("fc_norm", StepKind::Norm, Repr::Invariant, &f, df)?;
                (f, df)
            }
        };
        if at == Readout::Features {
            let logits = self.logits(&f)?;
            // A distilled ViT's features are the mean of its two tokens (timm's pre_logits).
            let (y, dy) = match self.head_dist {
                Some(_) => (f.mean(1)?, df.mean(2)?),
                None => (f, df),
            };
            return Ok(ReadoutJvp { logits, y, dy });
        }
        let (logits, dlogits) = match &self.head_dist {
            Some(hd) => {
                let (a, da) = self.head.jvp(&f.get_on_dim(1, 0)?, &df.get_on_dim(2, 0)?, tape)?;
                let (b, db) = hd.jvp(&f.get_on_dim(1, 1)?, &df.get_on_dim(2, 1)?, tape)?;
                (((a + b)? / 2.0)?, ((da + db)? / 2.0)?)
            }
            None => self.head.jvp(&f, &df, tape)?,
        };
        let dlogits = tape.step("head", StepKind::Head, Repr::Invariant, &logits, dlogits)?;
        Ok(ReadoutJvp {
            y: logits.clone(),
            logits,
            dy: dlogits,
        })
    }
}
