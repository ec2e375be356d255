//! Strict parsing (unknown keys and wrong types name the key, file and line), `--set` overrides,
//! and the range checks every value must pass before any work starts.

use super::{Config, DataSource, InitWeights, LeeOutput, ModelKind, Objective, Pool, Precision};
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{origin}: not valid TOML: {message}")]
    Parse { origin: String, message: String },
    #[error("{origin}{line}: config key `{key}`: {message}")]
    Key {
        origin: String,
        line: String,
        key: String,
        message: String,
    },
    #[error("--set {text:?}: expected `dotted.key=value`, e.g. `--set train.base_lr=5e-4`")]
    OverrideSyntax { text: String },
    #[error("config key `{key}` = {value} is out of range: {allowed}")]
    OutOfRange {
        key: String,
        value: String,
        allowed: String,
    },
}

fn line_of(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(s) if !text.is_empty() => format!(":{}", text[..s.start.min(text.len())].matches('\n').count() + 1),
        _ => String::new(),
    }
}

/// Deserialize TOML text strictly; errors name the dotted key and the line.
pub(super) fn deserialize_str<T: DeserializeOwned>(text: &str, origin: &str) -> Result<T, ConfigError> {
    let de = toml::Deserializer::new(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let line = line_of(text, inner.span());
        if key == "." || key.is_empty() {
            ConfigError::Parse {
                origin: origin.into(),
                message: inner.message().to_string(),
            }
        } else {
            ConfigError::Key {
                origin: origin.into(),
                line,
                key,
                message: inner.message().to_string(),
            }
        }
    })
}

/// Deserialize an already-merged table (after overrides); errors name the dotted key.
pub(super) fn deserialize_table<T: DeserializeOwned>(table: toml::Table, origin: &str) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let key = e.path().to_string();
        ConfigError::Key {
            origin: origin.into(),
            line: String::new(),
            key,
            message: e.into_inner().message().to_string(),
        }
    })
}

/// Apply one `dotted.key=value`. The value is read as a TOML value (`5e-4`, `true`, `[1, 2]`,
/// `"text"`), falling back to a bare string so `--set model.kind=cnn` works.
pub(super) fn apply_override(table: &mut toml::Table, text: &str) -> Result<(), ConfigError> {
    let (key, raw) = text
        .split_once('=')
        .ok_or_else(|| ConfigError::OverrideSyntax { text: text.into() })?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(str::is_empty) {
        return Err(ConfigError::OverrideSyntax { text: text.into() });
    }
    let raw = raw.trim();
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.split('.').collect();
    let mut cur = table;
    for part in &parts[..parts.len() - 1] {
        let entry = cur
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry.as_table_mut().ok_or_else(|| ConfigError::Key {
            origin: "--set".into(),
            line: String::new(),
            key: key.into(),
            message: format!("`{part}` is a value, not a section"),
        })?;
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

fn check(ok: bool, key: &str, value: impl std::fmt::Display, allowed: &str) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::OutOfRange {
            key: key.into(),
            value: value.to_string(),
            allowed: allowed.into(),
        })
    }
}

/// The dotted key and value of the first NaN or infinite float in `value` (every float of the
/// config is a finite quantity: rates, sizes in [0, 1], degrees, statistics).
fn non_finite(value: &toml::Value, key: &str) -> Option<(String, f64)> {
    let join = |k: &str| {
        if key.is_empty() {
            k.to_string()
        } else {
            format!("{key}.{k}")
        }
    };
    match value {
        toml::Value::Float(f) if !f.is_finite() => Some((key.to_string(), *f)),
        toml::Value::Table(t) => t.iter().find_map(|(k, v)| non_finite(v, &join(k))),
        toml::Value::Array(a) => a
            .iter()
            .enumerate()
            .find_map(|(i, v)| non_finite(v, &format!("{key}[{i}]"))),
        _ => None,
    }
}

impl Config {
    /// Every range check, in one place. Called by `resolve`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // Before the range checks: some keys (data.mean) have no range a NaN would fail.
        if let Some((key, value)) = toml::Value::try_from(self).ok().and_then(|v| non_finite(&v, "")) {
            return Err(ConfigError::OutOfRange {
                key,
                value: value.to_string(),
                allowed: "a finite number".into(),
            });
        }
        check(
            !self.name.is_empty() && !self.name.contains(['/', '\\']),
            "name",
            format!("{:?}", self.name),
            "a non-empty name without slashes",
        )?;
        let dev_ok = matches!(self.device.as_str(), "auto" | "cpu" | "cuda")
            || self
                .device
                .strip_prefix("cuda:")
                .is_some_and(|n| n.parse::<usize>().is_ok());
        check(
            dev_ok,
            "device",
            format!("{:?}", self.device),
            "\"auto\", \"cpu\", \"cuda\" or \"cuda:N\"",
        )?;

        let d = &self.data;
        check(d.train_size > 0, "data.train_size", d.train_size, "at least 1")?;
        check(d.test_size > 0, "data.test_size", d.test_size, "at least 1")?;
        let pool = d.train_size + d.val_size + d.test_size;
        check(
            pool <= 70_000,
            "data.test_size",
            pool,
            "train_size + val_size + test_size ≤ 70000 (the MNIST pool)",
        )?;
        for (key, v) in [("data.mean", &d.mean), ("data.std", &d.std)] {
            check(
                v.0.len() == 1 || v.0.len() == d.channels,
                key,
                format!("{:?}", v.0),
                &format!("one number, or one per channel (data.channels = {})", d.channels),
            )?;
        }
        check(
            d.std.0.iter().all(|&s| s > 0.0),
            "data.std",
            format!("{:?}", d.std.0),
            "> 0",
        )?;
        check(
            d.crop_pct > 0.0 && d.crop_pct <= 1.0,
            "data.crop_pct",
            d.crop_pct,
            "in (0, 1]",
        )?;
        check(
            d.source != DataSource::Parquet || d.parquet.repo.contains('/'),
            "data.parquet.repo",
            format!("{:?}", d.parquet.repo),
            "a Hub dataset repo owner/name (data.source = \"parquet\")",
        )?;
        check(
            d.source != DataSource::Folder || !d.folder.is_empty(),
            "data.folder",
            "\"\"",
            "a folder holding train/ and test/ (data.source = \"folder\")",
        )?;
        check(d.image_size >= 8, "data.image_size", d.image_size, "at least 8 pixels")?;
        check(
            d.channels == 1 || d.channels == 3,
            "data.channels",
            d.channels,
            "1 or 3",
        )?;
        for (i, o) in d.ood.iter().enumerate() {
            let ok = !o.name.is_empty() && o.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            check(
                ok,
                &format!("data.ood[{i}].name"),
                format!("{:?}", o.name),
                "letters, digits and _",
            )?;
        }

        let m = &self.model;
        check(m.num_classes >= 2, "model.num_classes", m.num_classes, "at least 2")?;
        check(
            m.average_rotations <= 64,
            "model.average_rotations",
            m.average_rotations,
            "0 (off) or the order N ≤ 64 of the rotation group to average over",
        )?;
        let v = &m.vit;
        // The ViT's patches must tile the image only when a ViT is built (the MAE stage too).
        let vit_built = m.kind == ModelKind::Vit || self.pretrain.enabled;
        check(
            v.patch_size > 0 && (!vit_built || d.image_size.is_multiple_of(v.patch_size)),
            "model.vit.patch_size",
            v.patch_size,
            &format!("a divisor of data.image_size = {}", d.image_size),
        )?;
        check(
            v.dim > 0 && v.heads > 0 && v.dim.is_multiple_of(v.heads),
            "model.vit.heads",
            v.heads,
            &format!("a divisor of model.vit.dim = {}", v.dim),
        )?;
        check(v.depth > 0, "model.vit.depth", v.depth, "at least 1")?;
        check(v.mlp_ratio > 0.0, "model.vit.mlp_ratio", v.mlp_ratio, "> 0")?;
        check(
            (0.0..1.0).contains(&v.drop_path),
            "model.vit.drop_path",
            v.drop_path,
            "in [0, 1)",
        )?;
        check(v.ln_eps > 0.0, "model.vit.ln_eps", v.ln_eps, "> 0")?;
        check(
            v.class_token || v.pool == Pool::Mean,
            "model.vit.class_token",
            "false",
            "true with pool = \"cls\" (without a class token the head reads the mean of the patch tokens: pool = \"mean\")",
        )?;
        check(
            !v.distilled || (v.class_token && v.reg_tokens == 0 && v.pool == Pool::Cls),
            "model.vit.distilled",
            "true",
            "true only with class_token = true, pool = \"cls\" and no reg_tokens (DeiT's layout, as timm's VisionTransformerDistilled)",
        )?;
        check(
            v.init_values >= 0.0,
            "model.vit.init_values",
            v.init_values,
            ">= 0 (0 = no layer scale)",
        )?;
        let standard = v.class_token && v.reg_tokens == 0 && !v.no_embed_class && !v.pre_norm && !v.distilled;
        check(
            standard || !self.pretrain.enabled,
            "pretrain.enabled",
            "true",
            "false with model.vit's class_token = false, reg_tokens, no_embed_class, pre_norm or distilled (the MAE encoder is the standard ViT)",
        )?;
        let a = &m.mae;
        check(
            a.mask_ratio > 0.0 && a.mask_ratio < 1.0,
            "model.mae.mask_ratio",
            a.mask_ratio,
            "in (0, 1)",
        )?;
        check(
            a.decoder_dim > 0 && a.decoder_heads > 0 && a.decoder_dim.is_multiple_of(a.decoder_heads),
            "model.mae.decoder_heads",
            a.decoder_heads,
            "a divisor of model.mae.decoder_dim",
        )?;
        check(
            !m.cnn.widths.is_empty() && m.cnn.widths.iter().all(|&w| w > 0),
            "model.cnn.widths",
            format!("{:?}", m.cnn.widths),
            "a non-empty list of positive widths",
        )?;
        check(m.cnn.blocks > 0, "model.cnn.blocks", m.cnn.blocks, "at least 1")?;
        check(
            matches!(m.gcnn.group_order, 4 | 8 | 16),
            "model.gcnn.group_order",
            m.gcnn.group_order,
            "4, 8 or 16",
        )?;
        check(
            m.gcnn.kernel_size % 2 == 1,
            "model.gcnn.kernel_size",
            m.gcnn.kernel_size,
            "odd",
        )?;
        check(
            !m.gcnn.widths.is_empty() && m.gcnn.widths.iter().all(|&w| w > 0),
            "model.gcnn.widths",
            format!("{:?}", m.gcnn.widths),
            "a non-empty list of positive widths",
        )?;

        let r = &m.resnet;
        check(
            !r.layers.is_empty() && r.layers.iter().all(|&l| l > 0),
            "model.resnet.layers",
            format!("{:?}", r.layers),
            "a non-empty list of positive block counts",
        )?;
        check(
            r.channels.len() == r.layers.len() && r.channels.iter().all(|&c| c > 0),
            "model.resnet.channels",
            format!("{:?}", r.channels),
            &format!(
                "{} positive widths, one per entry of model.resnet.layers",
                r.layers.len()
            ),
        )?;
        check(
            (0.0..1.0).contains(&r.drop_path_rate),
            "model.resnet.drop_path_rate",
            r.drop_path_rate,
            "in [0, 1)",
        )?;
        let c = &m.convnext;
        check(
            !c.depths.is_empty() && c.depths.iter().all(|&l| l > 0),
            "model.convnext.depths",
            format!("{:?}", c.depths),
            "a non-empty list of positive block counts",
        )?;
        check(
            c.dims.len() == c.depths.len() && c.dims.iter().all(|&d| d > 0),
            "model.convnext.dims",
            format!("{:?}", c.dims),
            &format!(
                "{} positive widths, one per entry of model.convnext.depths",
                c.depths.len()
            ),
        )?;
        check(
            c.kernel_sizes % 2 == 1,
            "model.convnext.kernel_sizes",
            c.kernel_sizes,
            "odd",
        )?;
        check(c.norm_eps > 0.0, "model.convnext.norm_eps", c.norm_eps, "> 0")?;
        check(
            c.ls_init_value >= 0.0,
            "model.convnext.ls_init_value",
            c.ls_init_value,
            ">= 0",
        )?;
        check(
            (0.0..1.0).contains(&c.drop_path_rate),
            "model.convnext.drop_path_rate",
            c.drop_path_rate,
            "in [0, 1)",
        )?;
        if m.kind == ModelKind::Convnext {
            // The grid after each stage, as timm builds it (floor at each stride-2 conv), and
            // timm's dilation past an output stride of 32, which we do not build.
            let mut side = d.image_size / c.patch_size.max(1);
            let mut stride = c.patch_size.max(1);
            for s in 0..c.depths.len() {
                let st = c.stage_stride(s);
                check(
                    !(stride >= 32 && st > 1),
                    "model.convnext.patch_size",
                    c.patch_size,
                    "a patch size that keeps the total stride at most 32 (timm dilates the later stages instead)",
                )?;
                stride *= st;
                side /= st;
            }
            check(
                c.patch_size > 0 && side > 0,
                "model.convnext.patch_size",
                c.patch_size,
                &format!(
                    "a patch size that leaves at least one pixel after {} stages at data.image_size = {} \
                     (the stem divides the side by patch_size, stage 0 halves it too when patch_size = 2, \
                     every later stage halves it; e.g. patch_size = 1 at 28 px)",
                    c.depths.len(),
                    d.image_size
                ),
            )?;
        }
        let mut names = std::collections::BTreeSet::new();
        for zm in &self.zoo.models {
            // A folder and file name on every file system: no case-only differences either.
            let ok = !zm.name.is_empty()
                && !zm.name.starts_with('.')
                && zm.name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
                && names.insert(zm.name.to_ascii_lowercase());
            check(
                ok,
                "zoo.models.name",
                format!("{:?}", zm.name),
                "letters, digits, `_`, `-` and `.` (not first), different for every model (ignoring case)",
            )?;
        }

        let i = &self.init;
        check(
            i.weights != InitWeights::Hub || !i.hub_repo.is_empty(),
            "init.hub_repo",
            "\"\"",
            "a repo id such as \"facebook/vit-mae-base\" when init.weights = \"hub\"",
        )?;
        check(
            i.weights != InitWeights::File || !i.file.is_empty(),
            "init.file",
            "\"\"",
            "a checkpoint path when init.weights = \"file\"",
        )?;
        check(
            i.weights != InitWeights::Pretrain || self.pretrain.enabled,
            "init.weights",
            "\"pretrain\"",
            "\"pretrain\" only with pretrain.enabled = true",
        )?;

        let p = &self.pretrain;
        if p.enabled {
            check(
                m.kind == ModelKind::Vit,
                "pretrain.enabled",
                "true",
                "MAE pretraining needs model.kind = \"vit\"",
            )?;
            check(p.steps > 0, "pretrain.steps", p.steps, "at least 1")?;
            check(p.batch_size > 0, "pretrain.batch_size", p.batch_size, "at least 1")?;
            check(
                p.base_lr > 0.0 && p.base_lr.is_finite(),
                "pretrain.base_lr",
                p.base_lr,
                "> 0",
            )?;
        }

        let t = &self.train;
        check(t.batch_size > 0, "train.batch_size", t.batch_size, "at least 1")?;
        check(t.accum_steps > 0, "train.accum_steps", t.accum_steps, "at least 1")?;
        check(
            t.base_lr > 0.0 && t.base_lr.is_finite(),
            "train.base_lr",
            t.base_lr,
            "> 0 (the actual lr is base_lr × batch / 256)",
        )?;
        check(
            t.min_lr >= 0.0 && t.min_lr <= t.base_lr * (t.batch_size * t.accum_steps) as f64 / 256.0,
            "train.min_lr",
            t.min_lr,
            "in [0, actual lr]",
        )?;
        check(t.weight_decay >= 0.0, "train.weight_decay", t.weight_decay, "≥ 0")?;
        check(
            t.layer_decay > 0.0 && t.layer_decay <= 1.0,
            "train.layer_decay",
            t.layer_decay,
            "in (0, 1]",
        )?;
        check((0.0..1.0).contains(&t.beta1), "train.beta1", t.beta1, "in [0, 1)")?;
        check((0.0..1.0).contains(&t.beta2), "train.beta2", t.beta2, "in [0, 1)")?;
        check(t.eps > 0.0, "train.eps", t.eps, "> 0")?;
        check(
            (0.0..1.0).contains(&t.label_smoothing),
            "train.label_smoothing",
            t.label_smoothing,
            "in [0, 1)",
        )?;
        check(t.grad_clip >= 0.0, "train.grad_clip", t.grad_clip, "≥ 0 (0 = off)")?;
        check(
            t.lee_penalty >= 0.0,
            "train.lee_penalty",
            t.lee_penalty,
            "≥ 0 (0 = off)",
        )?;
        check(
            t.lee_penalty_images <= t.batch_size,
            "train.lee_penalty_images",
            t.lee_penalty_images,
            "≤ train.batch_size (0 = the whole batch)",
        )?;
        check(
            !t.grad_checkpointing || self.model.kind == ModelKind::Vit || t.objective == Objective::Mae,
            "train.grad_checkpointing",
            t.grad_checkpointing,
            "false: it checkpoints transformer blocks, and model.kind is not \"vit\"",
        )?;
        check(
            t.precision == Precision::F32 || self.model.kind == ModelKind::Vit || t.objective == Objective::Mae,
            "train.precision",
            format!("\"{}\"", t.precision),
            "\"f32\": bf16 is implemented for the ViT (and MAE pretraining), and model.kind is not \"vit\" \
             (batch norm keeps its running statistics in f32 variables)",
        )?;
        check(t.eval_every > 0, "train.eval_every", t.eval_every, "at least 1")?;
        check(
            t.checkpoint_every > 0,
            "train.checkpoint_every",
            t.checkpoint_every,
            "at least 1",
        )?;

        let g = &self.augment;
        check(
            (0.0..=180.0).contains(&g.rotate_deg),
            "augment.rotate_deg",
            g.rotate_deg,
            "in [0, 180] degrees",
        )?;
        check(
            (0.0..=1.0).contains(&g.translate),
            "augment.translate",
            g.translate,
            "in [0, 1]",
        )?;
        check((0.0..1.0).contains(&g.scale), "augment.scale", g.scale, "in [0, 1)")?;
        check(g.mixup_alpha >= 0.0, "augment.mixup_alpha", g.mixup_alpha, "≥ 0")?;
        check(g.cutmix_alpha >= 0.0, "augment.cutmix_alpha", g.cutmix_alpha, "≥ 0")?;
        check(
            (0.0..=1.0).contains(&g.erase_prob),
            "augment.erase_prob",
            g.erase_prob,
            "in [0, 1]",
        )?;
        check((0.0..=1.0).contains(&g.hflip), "augment.hflip", g.hflip, "in [0, 1]")?;
        let [s0, s1] = g.crop_scale;
        check(
            0.0 < s0 && s0 <= s1 && s1 <= 1.0,
            "augment.crop_scale",
            format!("{:?}", g.crop_scale),
            "[lo, hi] with 0 < lo ≤ hi ≤ 1 (fractions of the image's area)",
        )?;
        let [r0, r1] = g.crop_ratio;
        check(
            0.0 < r0 && r0 <= r1,
            "augment.crop_ratio",
            format!("{:?}", g.crop_ratio),
            "[lo, hi] with 0 < lo ≤ hi (width / height)",
        )?;
        let photos = matches!(self.data.source, DataSource::Folder | DataSource::Parquet);
        let digits_only = "unset unless data.source = \"folder\" or \"parquet\" (a photo transform; digits are augmented by rotate_deg, translate and scale)";
        check(
            !g.random_resized_crop || photos,
            "augment.random_resized_crop",
            g.random_resized_crop,
            digits_only,
        )?;
        check(g.hflip == 0.0 || photos, "augment.hflip", g.hflip, digits_only)?;
        for (i, o) in self.data.ood.iter().enumerate() {
            check(
                !(photos && o.rotate),
                &format!("data.ood[{i}].rotate"),
                o.rotate,
                "false for photos (the seeded rotation is MNIST-rot's, for digits): set data.ood = [] or \
                 give each OOD set rotate = false and a folder of class folders (path) or a Hub repo (hub_repo)",
            )?;
        }

        check(
            self.eval.batch_size > 0,
            "eval.batch_size",
            self.eval.batch_size,
            "at least 1",
        )?;
        let l = &self.lee;
        check(l.batch_size > 0, "lee.batch_size", l.batch_size, "at least 1")?;
        check(
            l.layerwise_probes <= 1_000_000,
            "lee.layerwise_probes",
            l.layerwise_probes,
            "0 (exact) to 1000000",
        )?;
        check(
            (1..=1000).contains(&l.metric_draws),
            "lee.metric_draws",
            l.metric_draws,
            "1 to 1000",
        )?;
        // Patch tokens exist in the ViT only, and averaging over rotated copies is defined for a
        // rotation-invariant output, not for tokens that move with the image.
        let tokens_ok = self.model.kind == ModelKind::Vit && self.model.average_rotations <= 1;
        for (key, out) in [
            ("lee.output", l.output),
            ("train.lee_penalty_output", self.train.lee_penalty_output),
        ] {
            check(
                out != LeeOutput::Tokens || tokens_ok,
                key,
                "\"tokens\"",
                "\"probs\", \"logits\" or \"features\": tokens are the patch tokens of a ViT without model.average_rotations",
            )?;
        }
        let splits = self.split_names();
        for (k, s) in self.eval.splits.iter().enumerate() {
            check(
                splits.contains(s),
                &format!("eval.splits[{k}]"),
                format!("{s:?}"),
                &format!("one of {splits:?}"),
            )?;
        }
        for (k, s) in l.splits.iter().enumerate() {
            check(
                splits.contains(s),
                &format!("lee.splits[{k}]"),
                format!("{s:?}"),
                &format!("one of {splits:?}"),
            )?;
        }
        check(!self.output.dir.is_empty(), "output.dir", "\"\"", "a directory path")?;
        Ok(())
    }

    /// Every split name this config defines: train, val, test and `ood_<name>` per OOD set.
    pub fn split_names(&self) -> Vec<String> {
        // A photo folder has val/ or not, a Parquet set a val split name or not; the digit pool
        // always has a val split (maybe empty).
        let val = match self.data.source {
            DataSource::Folder => Path::new(&self.data.folder).join("val").is_dir(),
            DataSource::Parquet => !self.data.parquet.val.is_empty(),
            _ => true,
        };
        let main = ["train", "val", "test"].into_iter().filter(|&s| s != "val" || val);
        let mut v: Vec<String> = main.map(String::from).collect();
        v.extend(self.data.ood.iter().map(|o| format!("ood_{}", o.name)));
        v
    }
}
