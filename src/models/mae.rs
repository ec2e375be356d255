//! Masked autoencoder pretraining (He et al. 2022), following facebookresearch/mae `models_mae.py`:
//! per-sample random masking (argsort of uniform noise), the ViT encoder on the visible patches
//! plus cls, a narrow decoder with a mask token and a fixed sin-cos position embedding, and the
//! per-patch (optionally normalised) pixel MSE on the masked patches only.
//!
//! The encoder's parameters are exactly the ViT's (`patch_embed`, `cls_token`, `pos_embed`,
//! `blocks.{i}`, `norm`, at the root of the VarBuilder), so a [`Vit`](super::vit::Vit) built on the
//! same VarMap fine-tunes the pretrained encoder; the decoder lives under `decoder_*` / `mask_token`.
//! One deliberate difference: MAE keeps `int(N·(1 − ratio))` patches, we keep the rounded count.

use crate::config::{MaeConfig, VitConfig};
use crate::models::layers::{layer_norm, linear, patch_embed, LayerNorm, Linear, PatchEmbed};
use crate::models::vit::{block, blocks, pos_embed, sincos_pos_embed, token_grid, Block};
use crate::models::Rng;
use candle_core::{Result, Tensor, D};
use candle_nn::{Init, VarBuilder};
use rand::Rng as _;

fn keep_count(n: usize, mask_ratio: f64) -> usize {
    (n as f64 * (1.0 - mask_ratio)).round() as usize
}

/// The encoder (shared with the ViT) and the MAE decoder.
#[derive(Clone, Debug)]
pub struct Mae {
    patch_embed: PatchEmbed,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
    decoder_embed: Linear,
    mask_token: Tensor,
    decoder_pos_embed: Tensor,
    decoder_blocks: Vec<Block>,
    decoder_norm: LayerNorm,
    decoder_pred: Linear,
    patch: usize,
    in_chans: usize,
    grid: (usize, usize),
    /// Recompute each encoder and decoder block in the backward (see [`Mae::set_grad_checkpointing`]).
    grad_checkpointing: bool,
    mask_ratio: f64,
    norm_pix_loss: bool,
}

/// Which patches a batch hides: per sample, the kept patch indices (in shuffled order) and the
/// binary mask over all patches (1 = masked), as `models_mae.random_masking` returns them.
#[derive(Clone, Debug)]
pub struct Masking {
    /// `(B, keep)` patch indices fed to the encoder.
    pub keep: Vec<Vec<usize>>,
    /// `(B, N)` 1.0 where the patch is hidden.
    pub mask: Vec<Vec<f64>>,
    /// `(B, N)` inverse of the shuffle: position of patch n in the shuffled sequence.
    pub restore: Vec<Vec<usize>>,
}

impl Masking {
    /// The masking that per-sample `noise` `(B, N)` selects, keeping the `keep` patches of least
    /// noise: `models_mae.random_masking`, and transformers' ViTMAE given its `noise` argument
    /// (which is how a test reproduces a reference's mask). Panics if `keep` exceeds a row.
    pub fn from_noise(noise: &[Vec<f64>], keep: usize) -> Self {
        let mut out = Masking {
            keep: Vec::with_capacity(noise.len()),
            mask: Vec::with_capacity(noise.len()),
            restore: Vec::with_capacity(noise.len()),
        };
        for row in noise {
            // ids_shuffle = argsort(noise): small noise is kept
            let mut shuffle: Vec<usize> = (0..row.len()).collect();
            shuffle.sort_by(|&i, &j| row[i].total_cmp(&row[j]));
            let mut restore = vec![0; row.len()];
            for (pos, &idx) in shuffle.iter().enumerate() {
                restore[idx] = pos;
            }
            let mask = restore.iter().map(|&pos| if pos < keep { 0.0 } else { 1.0 }).collect();
            out.keep.push(shuffle[..keep].to_vec());
            out.mask.push(mask);
            out.restore.push(restore);
        }
        out
    }
}

impl Mae {
    pub fn new(vit: &VitConfig, mae: &MaeConfig, image_size: usize, in_chans: usize, vb: VarBuilder) -> Result<Self> {
        let grid = token_grid(image_size, vit.patch_size)?;
        let n = grid.0 * grid.1;
        // MAE's decoder shares the encoder's MLP ratio, qkv bias and LayerNorm eps, no drop path.
        let dec_cfg = VitConfig {
            drop_path: 0.0,
            init_values: 0.0,
            ..vit.clone()
        };
        let decoder_blocks = (0..mae.decoder_depth)
            .map(|i| {
                block(
                    mae.decoder_dim,
                    mae.decoder_heads,
                    &dec_cfg,
                    0.0,
                    vb.pp("decoder_blocks").pp(i),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        if keep_count(n, mae.mask_ratio) == 0 {
            candle_core::bail!(
                "model.mae.mask_ratio = {} hides all {n} patches; lower it",
                mae.mask_ratio
            );
        }
        let p = vit.patch_size;
        Ok(Self {
            patch_embed: patch_embed(in_chans, vit.dim, p, true, vb.pp("patch_embed"))?,
            cls_token: vb.get_with_hints((1, 1, vit.dim), "cls_token", Init::Randn { mean: 0.0, stdev: 0.02 })?,
            pos_embed: pos_embed(vit.pos_embed, vit.dim, grid, 1, &vb)?,
            blocks: blocks(vit, vb.clone())?,
            norm: layer_norm(vit.dim, vit.ln_eps, vb.pp("norm"))?,
            decoder_embed: linear(vit.dim, mae.decoder_dim, true, vb.pp("decoder_embed"))?,
            mask_token: vb.get_with_hints(
                (1, 1, mae.decoder_dim),
                "mask_token",
                Init::Randn { mean: 0.0, stdev: 0.02 },
            )?,
            decoder_pos_embed: sincos_pos_embed(mae.decoder_dim, grid.0, grid.1, vb.dtype(), vb.device())?,
            decoder_blocks,
            decoder_norm: layer_norm(mae.decoder_dim, vit.ln_eps, vb.pp("decoder_norm"))?,
            decoder_pred: linear(mae.decoder_dim, p * p * in_chans, true, vb.pp("decoder_pred"))?,
            patch: p,
            in_chans,
            grid,
            grad_checkpointing: false,
            mask_ratio: mae.mask_ratio,
            norm_pix_loss: mae.norm_pix_loss,
        })
    }

    /// Patches the encoder sees: round(N·(1 − mask_ratio)) of the N patches.
    pub fn keep_count(&self) -> usize {
        keep_count(self.grid.0 * self.grid.1, self.mask_ratio)
    }

    /// `imgs: (B, C, H, W)` → `(B, h·w, p·p·C)`, pixels in (row, col, channel) order (MAE's layout).
    pub fn patchify(&self, imgs: &Tensor) -> Result<Tensor> {
        let (b, c, _, _) = imgs.dims4()?;
        let ((h, w), p) = (self.grid, self.patch);
        // (B, C, h, p, w, p) -> (B, h, w, p, p, C) -> (B, h·w, p·p·C)
        imgs.reshape((b, c, h, p, w, p))?
            .permute((0, 2, 4, 3, 5, 1))?
            .reshape((b, h * w, p * p * c))
    }

    /// Inverse of [`Mae::patchify`]: `(B, h·w, p·p·C)` → `(B, C, H, W)`.
    pub fn unpatchify(&self, x: &Tensor) -> Result<Tensor> {
        let b = x.dim(0)?;
        let ((h, w), p, c) = (self.grid, self.patch, self.in_chans);
        // (B, h·w, p·p·C) -> (B, h, w, p, p, C) -> (B, C, h, p, w, p) -> (B, C, H, W)
        x.reshape((b, h, w, p, p, c))?
            .permute((0, 5, 1, 3, 2, 4))?
            .reshape((b, c, h * p, w * p))
    }

    /// Draw a per-sample random masking of `b` samples from the seeded RNG.
    pub fn random_masking(&self, b: usize, rng: &mut Rng) -> Masking {
        let n = self.grid.0 * self.grid.1;
        let noise: Vec<Vec<f64>> = (0..b).map(|_| (0..n).map(|_| rng.random::<f64>()).collect()).collect();
        Masking::from_noise(&noise, self.keep_count())
    }

    /// Gather rows of `x: (B, M, D)` per sample: `idx[b]` of equal lengths L → `(B, L, D)`.
    fn gather(x: &Tensor, idx: &[Vec<usize>]) -> Result<Tensor> {
        let (b, m, d) = x.dims3()?;
        let l = idx.first().map_or(0, Vec::len);
        let flat: Vec<u32> = idx
            .iter()
            .enumerate()
            .flat_map(|(s, row)| row.iter().map(move |&i| (s * m + i) as u32))
            .collect();
        let flat = Tensor::from_vec(flat, b * l, x.device())?;
        // (B·M, D) -> (B·L, D) -> (B, L, D)
        x.reshape((b * m, d))?.index_select(&flat, 0)?.reshape((b, l, d))
    }

    /// Encoder on the visible patches: `(B, 1 + keep, D)` after the final norm.
    fn forward_encoder(&self, imgs: &Tensor, masking: &Masking) -> Result<Tensor> {
        let n = self.grid.0 * self.grid.1;
        let x = self
            .patch_embed
            .forward(imgs)?
            .broadcast_add(&self.pos_embed.narrow(1, 1, n)?)?;
        let x = Self::gather(&x, &masking.keep)?; // (B, keep, D)
        let (b, _, d) = x.dims3()?;
        let cls = (&self.cls_token + self.pos_embed.narrow(1, 0, 1)?)?.broadcast_as((b, 1, d))?;
        let mut x = Tensor::cat(&[&cls, &x], 1)?;
        for blk in &self.blocks {
            x = blk.forward_maybe_checkpointed(&x, None, self.grad_checkpointing)?;
        }
        self.norm.forward(&x)
    }

    /// Decoder: latent `(B, 1 + keep, D)` → per-patch pixel predictions `(B, N, p·p·C)`.
    fn forward_decoder(&self, latent: &Tensor, masking: &Masking) -> Result<Tensor> {
        let x = self.decoder_embed.forward(latent)?;
        let (b, l, dd) = x.dims3()?;
        let n = self.grid.0 * self.grid.1;
        let masked = self.mask_token.broadcast_as((b, n + 1 - l, dd))?;
        let x_ = Tensor::cat(&[&x.narrow(1, 1, l - 1)?, &masked], 1)?; // (B, N, Dd), shuffled order
        let x_ = Self::gather(&x_, &masking.restore)?; // unshuffle
        let mut x = Tensor::cat(&[&x.narrow(1, 0, 1)?, &x_], 1)?.broadcast_add(&self.decoder_pos_embed)?;
        for blk in &self.decoder_blocks {
            x = blk.forward_maybe_checkpointed(&x, None, self.grad_checkpointing)?;
        }
        let pred = self.decoder_pred.forward(&self.decoder_norm.forward(&x)?)?;
        pred.narrow(1, 1, n)
    }

    /// Reconstructions `(B, N, p·p·C)` for a given masking (in normalised-pixel units when
    /// `norm_pix_loss`).
    pub fn reconstruct(&self, imgs: &Tensor, masking: &Masking) -> Result<Tensor> {
        self.forward_decoder(&self.forward_encoder(imgs, masking)?, masking)
    }

    /// The loss for a given masking: mean over masked patches of the per-patch pixel MSE.
    pub fn loss_with(&self, imgs: &Tensor, masking: &Masking) -> Result<Tensor> {
        // Mixed precision (a model built in bf16, f32 images): the model computes in its dtype,
        // the target, the loss and its reductions in f32.
        let wide = crate::kernels::at_least_f32(imgs.dtype());
        let pred = self
            .reconstruct(&imgs.to_dtype(self.cls_token.dtype())?, masking)?
            .to_dtype(wide)?;
        let mut target = self.patchify(&imgs.to_dtype(wide)?)?;
        if self.norm_pix_loss {
            // per-patch mean and unbiased variance, as torch's `.var(dim=-1)`
            let k = target.dim(D::Minus1)?;
            if k < 2 {
                candle_core::bail!("model.mae.norm_pix_loss needs patches of at least 2 pixels, got {k}");
            }
            let centred = target.broadcast_sub(&target.mean_keepdim(D::Minus1)?)?;
            let var = (centred.sqr()?.sum_keepdim(D::Minus1)? / (k - 1) as f64)?;
            target = centred.broadcast_div(&(var + 1e-6)?.sqrt()?)?;
        }
        let per_patch = (pred - target)?.sqr()?.mean(D::Minus1)?; // (B, N)
        let (b, n) = per_patch.dims2()?;
        let mask: Vec<f64> = masking.mask.concat();
        let masked = mask.iter().sum::<f64>();
        let mask = Tensor::from_vec(mask, (b, n), imgs.device())?.to_dtype(per_patch.dtype())?;
        (per_patch * mask)?.sum_all()? / masked
    }

    /// Gradient checkpointing of the encoder's and the decoder's blocks (as the classifier's
    /// [`Model::set_grad_checkpointing`](crate::models::Model::set_grad_checkpointing)): the loss
    /// must then be differentiated by [`kernels::checkpoint::backward`](crate::kernels::checkpoint::backward).
    pub fn set_grad_checkpointing(&mut self, on: bool) {
        self.grad_checkpointing = on;
    }

    /// The MAE training loss on `imgs: (B, C, H, W)` with a fresh masking from `rng`.
    pub fn loss(&self, imgs: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        let masking = self.random_masking(imgs.dim(0)?, rng);
        self.loss_with(imgs, &masking)
    }
}
