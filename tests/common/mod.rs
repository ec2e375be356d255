//! Small test-local models implementing `Model` for the LEE and layerwise tests: a circular
//! convolution net (optionally with ReLUs), a linear model W·x, a soft-disk average and a
//! constant. Each calls `Tape::step` after every op, like the real models do. Also a tiny-ViT
//! config for tests that build the real models.
#![allow(dead_code)]

use candle_core::{DType, Device, Result, Tensor, Var, D};
use liederiv::jvp::{merge_tangent, split_tangent, tangent_mul, Jvp, Repr, StepKind, Tape};
use liederiv::models::{Model, Rng};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

pub fn rng(seed: u64) -> Rng {
    Rng::seed_from_u64(seed)
}

pub fn randn(shape: &[usize], scale: f64, dtype: DType, rng: &mut Rng) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| {
            let z: f64 = StandardNormal.sample(rng);
            scale * z
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Sums of random Gaussian blobs in the centre of a `size`×`size` image, exactly zero in a
/// border ring of width `ring` (so circular and reflected stencils agree there).
pub fn blob_images(b: usize, c: usize, size: usize, ring: usize, dtype: DType, rng: &mut Rng) -> Tensor {
    blob_images_width(b, c, size, ring, (1.2, 2.5), dtype, rng)
}

/// [`blob_images`] with blob standard deviations drawn from `width` (pixels).
pub fn blob_images_width(
    b: usize,
    c: usize,
    size: usize,
    ring: usize,
    width: (f64, f64),
    dtype: DType,
    rng: &mut Rng,
) -> Tensor {
    use rand::Rng as _;
    let mut v = Vec::with_capacity(b * c * size * size);
    for _ in 0..b * c {
        let blobs: Vec<(f64, f64, f64, f64)> = (0..3)
            .map(|_| {
                let cx = rng.random_range(0.35..0.65) * size as f64;
                let cy = rng.random_range(0.35..0.65) * size as f64;
                let s = rng.random_range(width.0..width.1);
                let a = rng.random_range(-1.0..1.0);
                (cx, cy, s, a)
            })
            .collect();
        for i in 0..size {
            for j in 0..size {
                let inside = i >= ring && j >= ring && i < size - ring && j < size - ring;
                let val: f64 = blobs
                    .iter()
                    .map(|(cx, cy, s, a)| {
                        let (dx, dy) = (j as f64 - cx, i as f64 - cy);
                        a * (-(dx * dx + dy * dy) / (2.0 * s * s)).exp()
                    })
                    .sum();
                v.push(if inside { val } else { 0.0 });
            }
        }
    }
    Tensor::from_vec(v, (b, c, size, size), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Circular padding by one pixel on the last two axes.
fn pad_circular(x: &Tensor) -> Result<Tensor> {
    let r = x.rank();
    let (h, w) = (x.dim(r - 2)?, x.dim(r - 1)?);
    let x = Tensor::cat(&[x.narrow(r - 1, w - 1, 1)?, x.clone(), x.narrow(r - 1, 0, 1)?], r - 1)?;
    Tensor::cat(&[x.narrow(r - 2, h - 1, 1)?, x.clone(), x.narrow(r - 2, 0, 1)?], r - 2)
}

pub fn circ_conv(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    pad_circular(x)?.conv2d(w, 0, 1, 1, 1)
}

/// Circular 3×3 convolutions (+ ReLU after each when `relu`), global mean pool, linear head.
pub struct ConvNet {
    pub convs: Vec<(Var, Var)>,
    pub head: (Var, Var),
    pub relu: bool,
}

impl ConvNet {
    pub fn random(channels: &[usize], k: usize, relu: bool, dtype: DType, seed: u64) -> Self {
        let mut r = rng(seed);
        let convs = channels
            .windows(2)
            .map(|io| {
                let w = randn(
                    &[io[1], io[0], 3, 3],
                    1.0 / (3.0 * (io[0] as f64).sqrt()),
                    dtype,
                    &mut r,
                );
                let b = randn(&[io[1]], 0.1, dtype, &mut r);
                (Var::from_tensor(&w).unwrap(), Var::from_tensor(&b).unwrap())
            })
            .collect();
        let c = *channels.last().unwrap();
        let hw = randn(&[k, c], 1.0, dtype, &mut r);
        let hb = randn(&[k], 0.1, dtype, &mut r);
        Self {
            convs,
            head: (Var::from_tensor(&hw).unwrap(), Var::from_tensor(&hb).unwrap()),
            relu,
        }
    }

    pub fn vars(&self) -> Vec<Var> {
        let mut v: Vec<Var> = self.convs.iter().flat_map(|(w, b)| [w.clone(), b.clone()]).collect();
        v.push(self.head.0.clone());
        v.push(self.head.1.clone());
        v
    }
}

impl Jvp for ConvNet {
    fn jvp(&self, x: &Tensor, dx: &Tensor, tape: &mut Tape) -> Result<(Tensor, Tensor)> {
        let (mut y, mut dy) = (x.clone(), dx.clone());
        for (i, (w, b)) in self.convs.iter().enumerate() {
            let c = b.dim(0)?;
            y = circ_conv(&y, w)?.broadcast_add(&b.reshape((1, c, 1, 1))?)?;
            let (m, t) = merge_tangent(&dy)?;
            dy = split_tangent(&circ_conv(&m, w)?, t)?;
            dy = tape.step(&format!("conv{i}"), StepKind::Conv, Repr::Image, &y, dy)?;
            if self.relu {
                let mask = y.ge(0.0)?.to_dtype(y.dtype())?;
                y = y.relu()?;
                dy = tangent_mul(&dy, &mask)?;
                dy = tape.step(&format!("relu{i}"), StepKind::Activation, Repr::Image, &y, dy)?;
            }
        }
        // (B, C, H, W) -> (B, C)
        y = y.mean(D::Minus1)?.mean(D::Minus1)?;
        dy = dy.mean(D::Minus1)?.mean(D::Minus1)?;
        dy = tape.step("pool", StepKind::Pool, Repr::Invariant, &y, dy)?;
        let (hw, hb) = &self.head;
        y = y.matmul(&hw.t()?)?.broadcast_add(hb)?;
        dy = dy.broadcast_matmul(&hw.t()?)?;
        dy = tape.step("head", StepKind::Head, Repr::Invariant, &y, dy)?;
        Ok((y, dy))
    }
}

impl Model for ConvNet {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = x.clone();
        for (w, b) in &self.convs {
            let c = b.dim(0)?;
            y = circ_conv(&y, w)?.broadcast_add(&b.reshape((1, c, 1, 1))?)?;
            if self.relu {
                y = y.relu()?;
            }
        }
        let y = y.mean(D::Minus1)?.mean(D::Minus1)?;
        y.matmul(&self.head.0.t()?)?.broadcast_add(&self.head.1)
    }
    fn forward_train(&self, x: &Tensor, _rng: &mut Rng) -> Result<Tensor> {
        self.forward(x)
    }
}

/// logits = W·vec(x) + b.
pub struct LinearModel {
    pub w: Tensor,
    pub b: Tensor,
}

impl Jvp for LinearModel {
    fn jvp(&self, x: &Tensor, dx: &Tensor, tape: &mut Tape) -> Result<(Tensor, Tensor)> {
        let y = self.forward(x)?;
        let (t, b) = (dx.dim(0)?, dx.dim(1)?);
        // (T, B, C, H, W) -> (T, B, C·H·W)
        let dy = dx.reshape((t, b, ()))?.broadcast_matmul(&self.w.t()?)?;
        let dy = tape.step("linear", StepKind::Linear, Repr::Invariant, &y, dy)?;
        Ok((y, dy))
    }
}

impl Model for LinearModel {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.flatten_from(1)?.matmul(&self.w.t()?)?.broadcast_add(&self.b)
    }
    fn forward_train(&self, x: &Tensor, _rng: &mut Rng) -> Result<Tensor> {
        self.forward(x)
    }
}

/// Weighted averages of x and x² over a soft (Gaussian) disk centred on the image, then a
/// linear head: invariant to rotations about the centre up to the grid's discretisation.
pub struct DiskModel {
    pub mask: Tensor,
    pub w: Tensor,
    pub b: Tensor,
}

impl DiskModel {
    pub fn new(size: usize, k: usize, dtype: DType, seed: u64) -> Self {
        let c = (size - 1) as f64 / 2.0;
        let sigma = size as f64 / 6.0;
        let m: Vec<f64> = (0..size * size)
            .map(|p| {
                let (i, j) = ((p / size) as f64 - c, (p % size) as f64 - c);
                (-(i * i + j * j) / (2.0 * sigma * sigma)).exp()
            })
            .collect();
        let s: f64 = m.iter().sum();
        let m: Vec<f64> = m.iter().map(|v| v / s).collect();
        let mask = Tensor::from_vec(m, (size, size), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let mut r = rng(seed);
        Self {
            mask,
            w: randn(&[k, 2], 3.0, dtype, &mut r),
            b: randn(&[k], 0.1, dtype, &mut r),
        }
    }

    /// Σ_u m(u)·v(u) over the last two axes.
    fn avg(&self, v: &Tensor) -> Result<Tensor> {
        v.broadcast_mul(&self.mask)?.sum(D::Minus1)?.sum(D::Minus1)
    }
}

impl Jvp for DiskModel {
    fn jvp(&self, x: &Tensor, dx: &Tensor, tape: &mut Tape) -> Result<(Tensor, Tensor)> {
        // (B, 1, H, W) -> features (B, 2): [avg x, avg x²]
        let feats = Tensor::cat(&[self.avg(x)?, self.avg(&x.sqr()?)?], D::Minus1)?;
        let dfeats = Tensor::cat(&[self.avg(dx)?, self.avg(&tangent_mul(dx, &(x * 2.0)?)?)?], D::Minus1)?;
        let dfeats = tape.step("disk_pool", StepKind::Pool, Repr::Invariant, &feats, dfeats)?;
        let y = feats.matmul(&self.w.t()?)?.broadcast_add(&self.b)?;
        let dy = dfeats.broadcast_matmul(&self.w.t()?)?;
        let dy = tape.step("head", StepKind::Head, Repr::Invariant, &y, dy)?;
        Ok((y, dy))
    }
}

impl Model for DiskModel {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let feats = Tensor::cat(&[self.avg(x)?, self.avg(&x.sqr()?)?], D::Minus1)?;
        feats.matmul(&self.w.t()?)?.broadcast_add(&self.b)
    }
    fn forward_train(&self, x: &Tensor, _rng: &mut Rng) -> Result<Tensor> {
        self.forward(x)
    }
}

/// The same logits for every input.
pub struct ConstantModel {
    pub logits: Tensor,
}

impl Jvp for ConstantModel {
    fn jvp(&self, x: &Tensor, dx: &Tensor, tape: &mut Tape) -> Result<(Tensor, Tensor)> {
        let y = self.forward(x)?;
        let k = y.dim(1)?;
        let dy = Tensor::zeros((dx.dim(0)?, dx.dim(1)?, k), y.dtype(), y.device())?;
        let dy = tape.step("constant", StepKind::Head, Repr::Invariant, &y, dy)?;
        Ok((y, dy))
    }
}

impl Model for ConstantModel {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let b = x.dim(0)?;
        self.logits.unsqueeze(0)?.repeat((b, 1))
    }
    fn forward_train(&self, x: &Tensor, _rng: &mut Rng) -> Result<Tensor> {
        self.forward(x)
    }
}

/// logits = W · x/‖x‖ (x flattened per image): invariant to saturation x ↦ (1 + t)·x by
/// construction, with a real JVP, J·dx = W · (dx/‖x‖ − x (x·dx)/‖x‖³), so its zero
/// saturation LEE is computed, not hard-coded; rotations and translations do change it.
pub struct ScaleInvariantModel {
    /// `(K, C·H·W)`.
    pub weight: Tensor,
}

impl ScaleInvariantModel {
    /// `x: (B, ...)` → `(x/‖x‖ flattened (B, N), 1/‖x‖ (B, 1))`.
    fn unit(x: &Tensor) -> Result<(Tensor, Tensor)> {
        let flat = x.flatten_from(1)?;
        let inv = flat.sqr()?.sum_keepdim(1)?.sqrt()?.recip()?;
        Ok((flat.broadcast_mul(&inv)?, inv))
    }
}

impl Jvp for ScaleInvariantModel {
    fn jvp(&self, x: &Tensor, dx: &Tensor, tape: &mut Tape) -> Result<(Tensor, Tensor)> {
        let (u, inv) = Self::unit(x)?;
        let y = u.matmul(&self.weight.t()?)?;
        let (t, b) = (dx.dim(0)?, dx.dim(1)?);
        let d = dx.reshape((t, b, u.dim(1)?))?;
        // du = (dx − u (u·dx)) / ‖x‖
        let along = tangent_mul(&d, &u)?.sum_keepdim(2)?;
        let du = tangent_mul(&(d - tangent_mul(&along, &u)?)?, &inv)?;
        let dy = du.broadcast_matmul(&self.weight.t()?)?;
        let dy = tape.step("normalise+head", StepKind::Head, Repr::Invariant, &y, dy)?;
        Ok((y, dy))
    }
}

impl Model for ScaleInvariantModel {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Self::unit(x)?.0.matmul(&self.weight.t()?)
    }
    fn forward_train(&self, x: &Tensor, _rng: &mut Rng) -> Result<Tensor> {
        self.forward(x)
    }
}

pub fn max_abs(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// max |a − b| in f64 (same shapes).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    max_abs(&(a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap())
}

/// ‖a − b‖ / ‖b‖ in f64.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let b64 = b.to_dtype(DType::F64).unwrap();
    norm(&(a.to_dtype(DType::F64).unwrap() - &b64).unwrap()) / norm(&b64).max(1e-300)
}

pub fn norm(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt()
}

/// The default config with a two-block ViT of width `dim` on 7×7 patches, then `extra` overrides.
pub fn tiny_vit_config(dim: usize, extra: &[&str]) -> liederiv::Config {
    let mut sets = vec![
        "model.vit.patch_size=7".to_string(),
        format!("model.vit.dim={dim}"),
        "model.vit.depth=2".into(),
        "model.vit.heads=2".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    liederiv::Config::resolve_str("", "<test>", &sets).unwrap()
}

/// A committed fixture under tests/fixtures.
pub fn fixture(rel: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// The encoder of the library-built ViT fixtures: img 28, patch 7, dim 32, depth 2, heads 2,
/// mlp 4×, LayerNorm eps 1e-6.
pub fn tiny_fixture_vit(
    pool: liederiv::config::Pool,
    pos_embed: liederiv::config::PosEmbed,
) -> liederiv::config::VitConfig {
    liederiv::config::VitConfig {
        patch_size: 7,
        dim: 32,
        depth: 2,
        heads: 2,
        mlp_ratio: 4.0,
        qkv_bias: true,
        pool,
        pos_embed,
        drop_path: 0.0,
        ln_eps: 1e-6,
        ..Default::default()
    }
}

/// A data root for CLI tests: `<dir>/mnist/` with `n_train` + `n_test` seeded 28×28 digits
/// (blobs, so rotations move mass) as raw IDX files, and the `--set` overrides that build the
/// MNIST-rot splits from it into `<dir>/cache` (train 40, val 0, test `n_test`).
pub fn mnist_root(dir: &std::path::Path, n_train: usize, n_test: usize) -> Vec<String> {
    let mnist = dir.join("mnist");
    std::fs::create_dir_all(&mnist).unwrap();
    for (prefix, n, seed) in [("train", n_train, 1), ("t10k", n_test, 2)] {
        let x = blob_images(n, 1, 28, 3, DType::F64, &mut rng(seed));
        let top = max_abs(&x);
        let pixels: Vec<u8> = (x / top)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .map(|v| (255.0 * v.clamp(0.0, 1.0)).round() as u8)
            .collect();
        let mut images = Vec::new();
        for v in [2051u32, n as u32, 28, 28] {
            images.extend_from_slice(&v.to_be_bytes());
        }
        images.extend_from_slice(&pixels);
        let mut labels = Vec::new();
        for v in [2049u32, n as u32] {
            labels.extend_from_slice(&v.to_be_bytes());
        }
        labels.extend((0..n).map(|i| ((i * 7 + seed as usize) % 10) as u8));
        std::fs::write(mnist.join(format!("{prefix}-images-idx3-ubyte")), images).unwrap();
        std::fs::write(mnist.join(format!("{prefix}-labels-idx1-ubyte")), labels).unwrap();
    }
    vec![
        format!("data.root={:?}", dir.display().to_string()),
        format!("data.cache_dir={:?}", dir.join("cache").display().to_string()),
        "data.train_size=40".into(),
        "data.val_size=0".into(),
        format!("data.test_size={n_test}"),
        format!("output.dir={:?}", dir.join("runs").display().to_string()),
        "output.progress=false".into(),
    ]
}

/// Run the `liederiv` binary with `args` and `--set` overrides: (success, stdout, stderr).
pub fn liederiv(args: &[&str], sets: &[String]) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_liederiv"));
    cmd.args(args);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every variable of `varmap` with its name, in name order.
pub fn named_vars(varmap: &candle_nn::VarMap) -> Vec<(String, Var)> {
    let mut v: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The commit hash of the repos [`populated_cache`] makes.
pub const HUB_COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A hf-hub cache folder holding `repo` at one commit with `files` (name, source path) in its
/// snapshot, as a download would leave it (offline loading reads it).
pub fn populated_cache(repo: &str, files: &[(&str, std::path::PathBuf)]) -> tempfile::TempDir {
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().join(format!("models--{}", repo.replace('/', "--")));
    std::fs::create_dir_all(dir.join("refs")).unwrap();
    std::fs::write(dir.join("refs/main"), HUB_COMMIT).unwrap();
    let snap = dir.join("snapshots").join(HUB_COMMIT);
    std::fs::create_dir_all(&snap).unwrap();
    for (name, src) in files {
        std::fs::copy(src, snap.join(name)).unwrap();
    }
    cache
}
