//! liederiv's side of `scripts/bench.sh`: the same measurements as
//! `scripts/reference/bench_torch.py`, in the same output format, on our models (release build).
//!
//! Per model, on a `(B, 1, 28, 28)` batch with 10 classes (`vit_base`: ViT-B/16 on `(B, 3, 224, 224)`,
//! the GPU-scale model; `--device cuda` times on the GPU, synchronising after every repetition):
//! - `train_ms`: training-mode forward + cross-entropy + backward + AdamW step;
//! - `forward_ms`: eval-mode forward (on `models::frozen`, as evaluation runs it);
//! - `lee_ms`: the JVP of softmax(model(x)) along one input tangent (eval mode), the LEE core;
//! - `peak_mb`: the process's peak resident set (`VmHWM`), like PyTorch's `ru_maxrss`.
//!
//! Each time is the median of `--reps` repetitions after `--warmup` untimed ones. Output: one line
//! `impl=ours model=NAME train_ms=X forward_ms=X lee_ms=X peak_mb=X isa=avx512|avx2` (`kernels::isa`;
//! `LIEDERIV_AVX512=0` forces avx2; `--portable`, `--grad-checkpointing` and `--bf16` say what they ran). `--kernels` instead times the
//! fused row kernels of `kernels` against their composed candle forms on the small ViT's
//! shapes (`kernel=NAME ... composed_ms=X fused_ms=X` lines), which is what each fusion buys.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use clap::Parser;
use liederiv::config::{Config, ModelKind, Pool, VitConfig};
use liederiv::jvp::Tape;
use liederiv::kernels;
use liederiv::lie::lee::softmax_jvp;
use liederiv::models::{build_cast, build_model, frozen, Rng};
use liederiv::runtime::select_device;
use liederiv::train::{AdamW, AdamWParams};
use rand::SeedableRng;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "Time train step / forward / LEE JVP of liederiv's models (see scripts/bench.sh)")]
struct Args {
    /// Comma-separated models: vit_tiny, vit_small, cnn, gcnn, vit_base.
    #[arg(long, default_value = "vit_tiny,vit_small,cnn,gcnn")]
    models: String,
    /// Images per batch.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Untimed repetitions before timing.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Time the fused kernels against their composed forms instead of whole models.
    #[arg(long)]
    kernels: bool,
    /// cpu, cuda, cuda:N or auto (as the config's `device`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Run the portable, composed ops that CUDA runs instead of the fused CPU kernels
    /// (`runtime.kernels = "portable"`): the GPU path's graph, measured on the CPU.
    #[arg(long)]
    portable: bool,
    /// Measure only the training step (the other times print as 0), so that the process's peak
    /// memory is the step's own: forward and LEE hold memory of their own.
    #[arg(long)]
    train_only: bool,
    /// Train with gradient checkpointing (`train.grad_checkpointing`): each ViT block keeps only
    /// its input and is recomputed in the backward.
    #[arg(long)]
    grad_checkpointing: bool,
    /// Train in bf16 mixed precision (`train.precision = "bf16"`): bf16 casts of the f32 weights,
    /// the loss in f32.
    #[arg(long)]
    bf16: bool,
    /// Time the photo loader alone instead: every image of FOLDER/train (an ImageFolder) decoded
    /// and preprocessed to 224 px, `--batch` at a time, as evaluation (resize 256 bicubic, centre
    /// crop) and as training (random resized crop, flip); `impl=ours model=loader_eval|loader_train
    /// images_per_s=X` lines (the best of `--reps` passes after `--warmup`).
    #[arg(long)]
    loader: Option<std::path::PathBuf>,
}

/// The benchmark's config for a model name (defaults elsewhere: 28×28×1, 10 classes).
fn config_for(name: &str) -> Result<Config> {
    let mut cfg = Config::default();
    match name {
        "vit_tiny" => (cfg.model.kind, cfg.model.vit) = (ModelKind::Vit, VitConfig::tiny_mnist()),
        "vit_small" => (cfg.model.kind, cfg.model.vit) = (ModelKind::Vit, VitConfig::small_mnist()),
        "cnn" => cfg.model.kind = ModelKind::Cnn,
        "gcnn" => cfg.model.kind = ModelKind::Gcnn,
        "vit_base" => {
            // ViT-B/16 at 224 px on RGB-replicated digits, as configs/rotmnist_mae_gpu.toml.
            (cfg.data.image_size, cfg.data.channels) = (224, 3);
            cfg.model.kind = ModelKind::Vit;
            cfg.model.vit = VitConfig {
                patch_size: 16,
                dim: 768,
                depth: 12,
                heads: 12,
                pool: Pool::Mean,
                ..VitConfig::default()
            };
        }
        other => bail!("unknown model {other:?}: use vit_tiny, vit_small, cnn, gcnn or vit_base"),
    }
    Ok(cfg)
}

/// Median wall time of `f` in milliseconds; GPU work is waited for before the clock stops.
fn timed(dev: &Device, warmup: usize, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    dev.synchronize()?;
    let mut ms = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        f()?;
        dev.synchronize()?;
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms[ms.len() / 2])
}

/// Peak resident set of this process in MiB (Linux `VmHWM`; 0 where unavailable).
fn peak_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn randn(shape: &[usize], seed: u64, dev: &Device) -> Result<Tensor> {
    use rand_distr::{Distribution, StandardNormal};
    let mut rng = Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
    Ok(Tensor::from_vec(v, shape, dev)?)
}

fn bench_model(name: &str, args: &Args) -> Result<()> {
    let cfg = config_for(name)?;
    let dev = select_device(&args.device)?;
    let (varmap, mut model) = build_model(&cfg, &dev).with_context(|| format!("building {name}"))?;
    model.set_grad_checkpointing(args.grad_checkpointing)?;
    let (b, c, s) = (args.batch, cfg.data.channels, cfg.data.image_size);
    let x = randn(&[b, c, s, s], 1, &dev)?;
    let dx = randn(&[1, b, c, s, s], 2, &dev)?; // one tangent direction: (T=1, B, C, H, W)
    let labels = Tensor::from_vec((0..b as u32).map(|i| i % 10).collect::<Vec<_>>(), b, &dev)?;
    // The trainer's own AdamW (parameter groups, decoupled weight decay), as `train` runs it.
    let vit_depth = (cfg.model.kind == ModelKind::Vit).then_some(cfg.model.vit.depth);
    let mut opt = AdamW::new(&varmap, AdamWParams::from_train(&cfg.train), vit_depth)?;
    let mut rng = Rng::seed_from_u64(cfg.seed);
    // Forward and LEE run as evaluation and `lee` run them: on detached views, no autograd graph
    // (PyTorch's side runs under no_grad / torch.func).
    let inference = frozen(&cfg, &varmap, &dev)?;

    let train_ms = timed(&dev, args.warmup, args.reps, || {
        let logits = if args.bf16 {
            // As the trainer: a model on fresh bf16 casts of the weights each step.
            let mut cast = build_cast(&cfg, &varmap, DType::BF16, &dev)?;
            cast.set_grad_checkpointing(args.grad_checkpointing)?;
            cast.forward_train(&x.to_dtype(DType::BF16)?, &mut rng)?
                .to_dtype(DType::F32)?
        } else {
            model.forward_train(&x, &mut rng)?
        };
        let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
        opt.accumulate(&kernels::checkpoint::backward(&loss)?)?;
        opt.step(1e-4)?;
        Ok(())
    })?;
    // --train-only: 0 for the others, so the peak is the training step's.
    let (forward_ms, lee_ms) = if args.train_only {
        (0.0, 0.0)
    } else {
        let forward_ms = timed(&dev, args.warmup, args.reps, || {
            inference.forward(&x)?;
            Ok(())
        })?;
        let lee_ms = timed(&dev, args.warmup, args.reps, || {
            let (logits, dlogits) = inference.jvp(&x, &dx, &mut Tape::off())?;
            let (_, dp) = softmax_jvp(&logits, &dlogits)?;
            dp.sum_all()?.to_scalar::<f32>()?;
            Ok(())
        })?;
        (forward_ms, lee_ms)
    };
    println!(
        "impl=ours model={name} train_ms={train_ms:.2} forward_ms={forward_ms:.2} lee_ms={lee_ms:.2} peak_mb={:.1} isa={} kernels={} grad_checkpointing={} precision={}",
        peak_mb(),
        kernels::isa(),
        if args.portable { "portable" } else { "fused" },
        args.grad_checkpointing,
        if args.bf16 { "bf16" } else { "f32" }
    );
    Ok(())
}

/// Forward and forward+backward of one row op, composed vs fused.
fn bench_kernel(
    name: &str,
    shape: &[usize],
    args: &Args,
    composed: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>,
    fused: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> Result<()> {
    let x = Var::from_tensor(&randn(shape, 3, &Device::Cpu)?)?;
    let g = randn(shape, 4, &Device::Cpu)?;
    let dims = format!("{shape:?}").replace(' ', ""); // one token: "[128,50,192]"
    let mut line = format!("kernel={name} shape={dims} isa={}", kernels::isa());
    for (label, f) in [("composed", composed), ("fused", fused)] {
        let fwd = timed(&Device::Cpu, args.warmup, args.reps, || {
            f(&x)?;
            Ok(())
        })?;
        let fwd_bwd = timed(&Device::Cpu, args.warmup, args.reps, || {
            (f(&x)? * &g)?.sum_all()?.backward()?;
            Ok(())
        })?;
        line.push_str(&format!(" {label}_fwd_ms={fwd:.2} {label}_fwdbwd_ms={fwd_bwd:.2}"));
    }
    println!("{line}");
    Ok(())
}

fn bench_kernels(args: &Args) -> Result<()> {
    let b = args.batch;
    // The small ViT's shapes: tokens (B, 50, 192), attention (B·3, 50, 50), MLP hidden (B, 50, 768).
    let w = Var::from_tensor(&(randn(&[192], 5, &Device::Cpu)? + 1.0)?)?;
    let bias = Var::from_tensor(&randn(&[192], 6, &Device::Cpu)?)?;
    bench_kernel(
        "layer_norm",
        &[b, 50, 192],
        args,
        &|x| kernels::layer_norm_composed(x, &w, &bias, 1e-6),
        &|x| kernels::layer_norm(x, &w, &bias, 1e-6),
    )?;
    bench_kernel(
        "softmax",
        &[b * 3, 50, 50],
        args,
        &kernels::softmax_composed,
        &kernels::softmax,
    )?;
    bench_kernel(
        "gelu",
        &[b, 50, 768],
        args,
        &kernels::gelu_erf_composed,
        &kernels::gelu_erf,
    )
}

fn main() -> Result<()> {
    liederiv::runtime::tune_process(); // as the CLI does: time what users run
    let args = Args::parse();
    kernels::set_portable(args.portable);
    if args.kernels {
        return bench_kernels(&args);
    }
    if let Some(folder) = &args.loader {
        return bench_loader(folder, &args);
    }
    for name in args.models.split(',') {
        bench_model(name.trim(), &args)?;
    }
    Ok(())
}

/// Images per second of the photo loader (`--loader`), evaluation and training transforms.
fn bench_loader(folder: &std::path::Path, args: &Args) -> Result<()> {
    let sets = [
        "data.source=\"folder\"".to_string(),
        format!("data.folder={:?}", folder.display().to_string()),
        "data.image_size=224".into(),
        "data.channels=3".into(),
        "data.mean=[0.485, 0.456, 0.406]".into(),
        "data.std=[0.229, 0.224, 0.225]".into(),
        "data.ood=[]".into(),
        "model.vit.patch_size=16".into(),
        "eval.splits=[\"train\"]".into(),
        "lee.splits=[\"train\"]".into(),
        "augment.random_resized_crop=true".into(),
        "augment.hflip=0.5".into(),
    ];
    let cfg = Config::resolve_str("", "<bench>", &sets)?;
    let split = liederiv::data::load_split(&cfg, "train")?;
    let device = Device::Cpu;
    let mut rng = Rng::seed_from_u64(0);
    for form in ["loader_eval", "loader_train"] {
        let mut pass = || -> Result<f64> {
            let t = Instant::now();
            let order: Vec<usize> = (0..split.len()).collect();
            for idx in order.chunks(args.batch.max(1)) {
                let (x, _) = match form {
                    "loader_eval" => liederiv::data::batch(&split, idx, &cfg.data, &device)?,
                    _ => liederiv::data::train_batch(&split, idx, &cfg.data, &cfg.augment, &device, &mut rng)?,
                };
                std::hint::black_box(x);
            }
            Ok(split.len() as f64 / t.elapsed().as_secs_f64())
        };
        for _ in 0..args.warmup {
            pass()?;
        }
        let mut best = 0f64;
        for _ in 0..args.reps.max(1) {
            best = best.max(pass()?);
        }
        println!(
            "impl=ours model={form} images={} batch={} images_per_s={best:.1} threads={}",
            split.len(),
            args.batch,
            rayon::current_num_threads()
        );
    }
    Ok(())
}
