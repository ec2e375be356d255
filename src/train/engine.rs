//! The training loop, one readable function per stage (nanoGPT's train.py loop, MAE's
//! `engine_finetune.train_one_epoch` steps): set the lr, accumulate micro-batches, clip and step,
//! evaluate every `train.eval_every` steps and at the end, checkpoint every
//! `train.checkpoint_every` steps and at the end. A run is an optional MAE pretraining stage
//! (`[pretrain]`, reused when its final checkpoint exists) followed by the main stage
//! (`train.objective` = classify | mae).
//!
//! Determinism: data order is `data::epoch_order(n, seed, epoch)`, everything else random
//! (augmentation, drop path, masking) draws from one ChaCha8 stream per stage; the checkpoint
//! stores the stream position, the (epoch, cursor) of the data order, the AdamW state and the
//! step, and evaluation consumes no randomness, so `--resume` ends bit-identical to an
//! uninterrupted run on CPU.

use super::checkpoint::{self, init_from_pretrain, CheckpointError, Meta, RngState};
use super::error::TrainError;
use super::evaluate::{cross_entropy, evaluate};
use super::run_dir::{prepare_run_dir, Start, CHECKPOINT, CLASSES_FILE, PRETRAIN_DIR};
use super::{AdamW, AdamWParams, Augmenter, Schedule};
use crate::config::{Config, InitWeights, ModelKind, Objective, Precision};
use crate::data::Split;
use crate::lie::{lee_penalty, LeeSpec};
use crate::models::init::SeededVarMap;
use crate::models::mae::Mae;
use crate::models::{Model, Rng};
use crate::progress::{self, Progress};
use crate::report::{eval_heading, eval_table, EvalRecord, MetricsLog, SplitMetrics};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use rand::SeedableRng;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// RNG stream ids of the two stages (the seed is the run's `seed`).
const STREAM_TRAIN: u64 = 1;
const STREAM_PRETRAIN: u64 = 2;

/// What a finished run reports.
pub struct RunSummary {
    pub run_dir: PathBuf,
    /// The final evaluation of the main stage.
    pub last: Option<EvalRecord>,
    /// The run's wall time, the processes before a `--resume` included (see `Meta::wall_time_s`);
    /// None when it resumed from a checkpoint that predates that record.
    pub wall_time_s: Option<f64>,
}

/// The run's wall clock: this process's time plus what the checkpoint it resumes from had spent
/// (None: that checkpoint predates the record). A finished run resumed again trains nothing and
/// keeps its time.
struct RunClock {
    start: Instant,
    carried_s: Option<f64>,
    finished: bool,
}

impl RunClock {
    fn seconds(&self) -> Option<f64> {
        let carried = self.carried_s?;
        Some(match self.finished {
            true => carried,
            false => carried + self.start.elapsed().as_secs_f64(),
        })
    }
}

/// The seeded data order: epoch `e` reads `epoch_order(n, seed, e)` in batches, dropping the
/// incomplete last batch (as `drop_last=True`).
struct DataCursor {
    n: usize,
    batch: usize,
    seed: u64,
    epoch: usize,
    cursor: usize,
    order: Vec<usize>,
}

impl DataCursor {
    fn new(n: usize, batch: usize, seed: u64, epoch: usize, cursor: usize) -> Self {
        Self {
            n,
            batch,
            seed,
            epoch,
            cursor,
            order: crate::data::epoch_order(n, seed, epoch as u64),
        }
    }

    fn next(&mut self) -> Vec<usize> {
        if self.cursor + self.batch > self.n {
            self.epoch += 1;
            self.cursor = 0;
            self.order = crate::data::epoch_order(self.n, self.seed, self.epoch as u64);
        }
        let idx = self.order[self.cursor..self.cursor + self.batch].to_vec();
        self.cursor += self.batch;
        idx
    }

    /// Epochs seen, fractional.
    fn epochs(&self) -> f64 {
        self.epoch as f64 + self.cursor as f64 / self.n as f64
    }
}

/// One stage's hyper-parameters and where it writes.
struct Stage {
    name: &'static str,
    dir: PathBuf,
    steps: usize,
    batch_size: usize,
    accum: usize,
    schedule: Schedule,
    stream: u64,
}

impl Stage {
    /// The MAE pretraining stage (`[pretrain]`, in `<run>/pretrain/`) or the main stage
    /// (`[train]`, in `<run>/`).
    fn of(cfg: &Config, run_dir: &Path, pretrain: bool) -> Stage {
        let (p, t) = (&cfg.pretrain, &cfg.train);
        let (name, dir, steps, batch_size, accum, peak_lr, min_lr, warmup_steps, stream) = match pretrain {
            true => (
                "pretrain",
                run_dir.join(PRETRAIN_DIR),
                p.steps,
                p.batch_size,
                1,
                cfg.pretrain_lr(),
                p.min_lr,
                p.warmup_steps,
                STREAM_PRETRAIN,
            ),
            false => (
                "train",
                run_dir.to_path_buf(),
                t.steps,
                t.batch_size,
                t.accum_steps,
                cfg.lr(),
                t.min_lr,
                t.warmup_steps,
                STREAM_TRAIN,
            ),
        };
        let schedule = Schedule {
            peak_lr,
            min_lr,
            warmup_steps,
            total_steps: steps,
        };
        Stage {
            name,
            dir,
            steps,
            batch_size,
            accum,
            schedule,
            stream,
        }
    }
}

/// Where a stage starts: (step, epoch, cursor, rng), fresh or from a checkpoint's meta.
fn start_state(stage: &Stage, cfg: &Config, meta: Option<&Meta>) -> Result<(usize, usize, usize, Rng), TrainError> {
    match meta {
        Some(m) => Ok((m.step, m.epoch, m.cursor, m.rng.restore().map_err(TrainError::Invalid)?)),
        None => {
            let mut rng = Rng::seed_from_u64(cfg.seed);
            rng.set_stream(stage.stream);
            Ok((0, 0, 0, rng))
        }
    }
}

/// The objective on one micro-batch: `(x, labels, rng) -> scalar loss`.
type LossFn<'a> = dyn FnMut(&Tensor, &[u32], &mut Rng) -> candle_core::Result<Tensor> + 'a;

/// Run one stage to its end. `loss_fn(x, labels, rng)` is the objective on one micro-batch;
/// `eval_fn(final)` the evaluation (empty for MAE).
#[allow(clippy::too_many_arguments)]
fn run_stage(
    cfg: &Config,
    stage: &Stage,
    varmap: &VarMap,
    opt: &mut AdamW,
    train: &Split,
    device: &Device,
    resume: Option<&Meta>,
    run_clock: &RunClock,
    loss_fn: &mut LossFn,
    eval_fn: &mut dyn FnMut(bool) -> candle_core::Result<BTreeMap<String, SplitMetrics>>,
) -> Result<Option<EvalRecord>, TrainError> {
    std::fs::create_dir_all(&stage.dir).map_err(|source| TrainError::RunDir {
        path: stage.dir.clone(),
        source,
    })?;
    let ckpt_path = stage.dir.join(CHECKPOINT);
    let (mut step, epoch, cursor, mut rng) = start_state(stage, cfg, resume)?;
    let first = step;
    if resume.is_some() {
        eprintln!("{}: resuming at step {step} of {}", stage.name, stage.steps);
    }
    let mut data = DataCursor::new(train.len(), stage.batch_size, cfg.seed, epoch, cursor);
    let mut log = match resume {
        Some(m) => MetricsLog::open_append(&stage.dir, m.step)?,
        None => MetricsLog::create(&stage.dir)?,
    };
    if cfg.output.tensorboard {
        log = log.with_tensorboard(resume.map(|m| m.step))?;
    }
    let mut last_good = match resume {
        Some(_) => ckpt_path.display().to_string(),
        None => "none (no checkpoint was written yet)".to_string(),
    };
    let bar = Progress::new(
        progress::Mode::detect(cfg.output.progress),
        stage.name,
        "steps",
        stage.steps as u64,
        step as u64,
        "{prefix} [{bar:30}] {pos}/{len} steps  {msg}  ETA {eta}",
    );
    let mut last = log.records().last().cloned();
    // Loss and throughput since the last eval.
    let (mut loss_sum, mut loss_n, mut images) = match resume {
        Some(m) => (m.loss_sum, m.loss_count, 0usize),
        None => (0.0f64, 0usize, 0usize),
    };
    let mut clock = Instant::now();
    // Step 0: the starting model (pretrained or not), the reference every fine-tuning curve is
    // read against. Evaluation draws no randomness, so the training that follows is unchanged.
    if step == 0 {
        let splits = eval_fn(false)?;
        if !splits.is_empty() {
            let record = EvalRecord {
                step: 0,
                epoch: 0.0,
                lr: stage.schedule.lr_at(0),
                train_loss: None,
                images_per_sec: 0.0,
                splits,
            };
            bar.println(&console(stage, &record));
            log.append(&record)?;
            last = Some(record);
        }
        clock = Instant::now();
    }
    while step < stage.steps {
        let lr = stage.schedule.lr_at(step);
        for _ in 0..stage.accum {
            let idx = data.next();
            let (x, y) = crate::data::train_batch(train, &idx, &cfg.data, &cfg.augment, device, &mut rng)?;
            let labels = y.to_vec1::<u32>()?;
            let loss = loss_fn(&x, &labels, &mut rng)?;
            let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            if !value.is_finite() {
                bar.abandon();
                return Err(TrainError::NonFinite {
                    stage: stage.name.into(),
                    step: step + 1,
                    value,
                    checkpoint: last_good,
                });
            }
            opt.accumulate(&crate::kernels::checkpoint::backward(&loss)?)?;
            loss_sum += value as f64;
            loss_n += 1;
            images += idx.len();
        }
        opt.step(lr)?;
        step += 1;
        let secs = clock.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!(
            "loss {:.4}  {:.0} img/s",
            loss_sum / loss_n as f64,
            images as f64 / secs
        ));
        bar.set_position(step as u64);

        let finished = step == stage.steps;
        if step % cfg.train.eval_every == 0 || finished {
            let record = EvalRecord {
                step,
                epoch: data.epochs(),
                lr,
                train_loss: Some(loss_sum / loss_n.max(1) as f64),
                images_per_sec: images as f64 / secs,
                splits: eval_fn(finished)?,
            };
            bar.println(&console(stage, &record));
            log.append(&record)?;
            last = Some(record);
            (loss_sum, loss_n, images) = (0.0, 0, 0);
            clock = Instant::now();
        }
        if step % cfg.train.checkpoint_every == 0 || finished {
            let meta = Meta {
                stage: stage.name.into(),
                step,
                total_steps: stage.steps,
                epoch: data.epoch,
                cursor: data.cursor,
                rng: RngState::of(&rng),
                loss_sum,
                loss_count: loss_n,
                metrics: serde_json::to_value(&last).unwrap_or(serde_json::Value::Null),
                config: cfg.to_toml(),
                wall_time_s: run_clock.seconds(),
            };
            checkpoint::save(&ckpt_path, varmap, opt.state_tensors()?, &meta)?;
            last_good = ckpt_path.display().to_string();
        }
    }
    bar.finish();
    eprintln!("{}: ran {} steps in this process", stage.name, step - first);
    Ok(last)
}

/// What the console shows after an evaluation: the stage, its training state, the split table.
fn console(stage: &Stage, r: &EvalRecord) -> String {
    format!("{} {}{}", stage.name, eval_heading(r), eval_table(r))
}

/// Load and check the checkpoint a stage resumes from.
fn resume_meta(path: &Path, cfg: &Config) -> Result<Meta, TrainError> {
    let meta = checkpoint::load_meta(path).map_err(|e| match e {
        CheckpointError::Missing { path } => TrainError::NoCheckpoint { path },
        other => other.into(),
    })?;
    // A checkpoint written before a config key existed lacks it: compare as configs, the
    // missing keys at their defaults, not as text.
    let same =
        meta.config == cfg.to_toml() || Config::resolve_str(&meta.config, "checkpoint", &[]).is_ok_and(|c| c == *cfg);
    if !same {
        return Err(TrainError::ConfigChanged {
            path: path.to_path_buf(),
        });
    }
    Ok(meta)
}

/// The MAE on the variables of `vb` (its weights' dtype is the one it computes in).
fn mae_on(cfg: &Config, vb: candle_nn::VarBuilder) -> candle_core::Result<Mae> {
    let mut mae = Mae::new(
        &cfg.model.vit,
        &cfg.model.mae,
        cfg.data.image_size,
        cfg.data.channels,
        vb,
    )?;
    mae.set_grad_checkpointing(cfg.train.grad_checkpointing);
    Ok(mae)
}

/// The dtype of the training step's casts under `train.precision = "bf16"` (None: f32, no casts).
fn mixed_precision(cfg: &Config) -> Option<DType> {
    (cfg.train.precision == Precision::Bf16).then_some(DType::BF16)
}

/// Run (or reuse, or resume) the MAE stage in `stage.dir`.
#[allow(clippy::too_many_arguments)]
fn run_mae(
    cfg: &Config,
    stage: &Stage,
    hp: AdamWParams,
    train: &Split,
    device: &Device,
    meta: Option<&Meta>,
    clock: &RunClock,
) -> Result<Option<EvalRecord>, TrainError> {
    let varmap = VarMap::new();
    let mae = mae_on(cfg, SeededVarMap::var_builder(&varmap, cfg.seed, DType::F32, device))?;
    let mut opt = AdamW::new(&varmap, hp, None)?;
    if let Some(m) = meta {
        let optim = checkpoint::load_weights(&stage.dir.join(CHECKPOINT), &varmap, device)?;
        opt.load_state(&optim, m.step)?;
    }
    // bf16: a model on fresh casts of the f32 weights each micro-batch (they change every step).
    let mut loss_fn = |x: &Tensor, _: &[u32], rng: &mut Rng| match mixed_precision(cfg) {
        None => mae.loss(x, rng),
        Some(dtype) => mae_on(cfg, crate::models::cast_var_builder(&varmap, dtype, device)?)?.loss(x, rng),
    };
    let mut eval_fn = |_: bool| Ok(BTreeMap::new());
    run_stage(
        cfg,
        stage,
        &varmap,
        &mut opt,
        train,
        device,
        meta,
        clock,
        &mut loss_fn,
        &mut eval_fn,
    )
}

/// `liederiv train`: the whole run. Bad inputs (a run directory that holds a run and no
/// `--resume` / `--overwrite`, an unwritable one, `--resume` without a checkpoint, unknown
/// splits, a batch larger than the training set) fail before training.
pub fn train(cfg: &Config, start: Start) -> Result<RunSummary, TrainError> {
    let started = Instant::now();
    let resume = start == Start::Resume;
    let run_dir = prepare_run_dir(cfg, start)?;
    let main_ckpt = run_dir.join(CHECKPOINT);
    let pre_dir = run_dir.join(PRETRAIN_DIR);
    let pre_ckpt = pre_dir.join(CHECKPOINT);
    // What to resume: the main stage's checkpoint, else (when pretraining) the pretrain stage's.
    let main_meta = if resume && (main_ckpt.exists() || !cfg.pretrain.enabled || !pre_ckpt.exists()) {
        Some(resume_meta(&main_ckpt, cfg)?)
    } else {
        None
    };
    // The time already spent: the main stage's checkpoint holds the whole run's so far; before
    // the main stage has one, the pretraining stage's checkpoint holds it if this run wrote it
    // (the same config): a stage copied from another run is reused, and its time is that run's.
    let carried_s = match &main_meta {
        Some(m) => m.wall_time_s,
        None if resume => resume_meta(&pre_ckpt, cfg).map_or(Some(0.0), |m| m.wall_time_s),
        None => Some(0.0),
    };
    let clock = RunClock {
        start: started,
        carried_s,
        finished: main_meta.as_ref().is_some_and(|m| m.step == m.total_steps),
    };
    let device = crate::runtime::select_device(&cfg.device)?;
    let train_set = crate::data::training_set(cfg)?;
    let pre_set = match cfg.pretrain.enabled {
        true => Some(crate::data::pretraining_set(cfg)?),
        false => None,
    };
    for (set, batch, key) in [
        (Some(&train_set), cfg.train.batch_size, "train"),
        (pre_set.as_ref(), cfg.pretrain.batch_size, "pretrain"),
    ] {
        if let Some(set) = set.filter(|s| batch > s.len()) {
            return Err(TrainError::Invalid(format!(
                "{key}.batch_size ({batch}) is larger than the {} set it trains on ({} images); lower it or raise data.train_limit",
                set.name,
                set.len()
            )));
        }
    }
    let classes = &train_set.classes;
    if cfg.model.num_classes != classes.len() {
        return Err(TrainError::Invalid(format!(
            "model.num_classes = {} but the {} set has {} classes ({}); set model.num_classes = {}",
            cfg.model.num_classes,
            train_set.name,
            classes.len(),
            classes.join(", "),
            classes.len()
        )));
    }
    // The class index → name map, beside the checkpoints that predict it.
    let doc = serde_json::json!({ "classes": classes });
    crate::report::write_atomic(&run_dir.join(CLASSES_FILE), format!("{doc:#}\n").as_bytes())
        .map_err(|e| TrainError::Invalid(format!("writing {}: {e}", run_dir.join(CLASSES_FILE).display())))?;
    eprintln!(
        "{}: {} training images, base lr {:.3e}, actual lr {:.3e} (× {} / 256), {} steps, device {:?}",
        cfg.name,
        train_set.len(),
        cfg.train.base_lr,
        cfg.lr(),
        cfg.train.batch_size * cfg.train.accum_steps,
        cfg.train.steps,
        device
    );

    if let Some(pre_set) = &pre_set {
        let p = &cfg.pretrain;
        let stage = Stage::of(cfg, &run_dir, true);
        let finished =
            checkpoint::load_meta(&pre_ckpt).is_ok_and(|m| m.step == m.total_steps && m.total_steps == p.steps);
        eprintln!(
            "pretrain: {} images ({}, pretrain.images = {})",
            pre_set.len(),
            pre_set.name,
            p.images
        );
        if finished {
            eprintln!("pretrain: reusing the finished stage in {}", pre_dir.display());
        } else if main_meta.is_none() {
            let pre_meta = if resume {
                Some(resume_meta(&pre_ckpt, cfg)?)
            } else {
                None
            };
            run_mae(
                cfg,
                &stage,
                AdamWParams::from_pretrain(p),
                pre_set,
                &device,
                pre_meta.as_ref(),
                &clock,
            )?;
        }
    }

    let t = &cfg.train;
    let stage = Stage::of(cfg, &run_dir, false);
    let hp = AdamWParams::from_train(t);
    if t.objective == Objective::Mae {
        let last = run_mae(cfg, &stage, hp, &train_set, &device, main_meta.as_ref(), &clock)?;
        return Ok(RunSummary {
            run_dir,
            last,
            wall_time_s: clock.seconds(),
        });
    }

    // Splits for evaluation, loaded once (the LEE subsets are their first lee.limit images).
    let mut names: Vec<String> = cfg.eval.splits.clone();
    names.extend(cfg.lee.splits.iter().cloned());
    names.sort();
    names.dedup();
    let mut splits = BTreeMap::new();
    for name in names {
        let s = crate::data::load_split(cfg, &name)?;
        splits.insert(name, s);
    }
    let spec = LeeSpec::of(&cfg.lee);

    let (varmap, mut model) = crate::models::build_model(cfg, &device)?;
    model.set_grad_checkpointing(t.grad_checkpointing)?;
    if cfg.init.weights == InitWeights::Pretrain && main_meta.is_none() {
        init_from_pretrain(&pre_ckpt, &varmap, &device)?;
    }
    let vit_depth = (cfg.model.kind == ModelKind::Vit).then_some(cfg.model.vit.depth);
    let mut opt = AdamW::new(&varmap, hp, vit_depth)?;
    if let Some(m) = &main_meta {
        let optim = checkpoint::load_weights(&main_ckpt, &varmap, &device)?;
        opt.load_state(&optim, m.step)?;
    }
    let augment = Augmenter::new(&cfg.augment, cfg.model.num_classes, t.label_smoothing, cfg.data.blank());
    let lambda = t.lee_penalty;
    let penalty_images = t.lee_penalty_images;
    let model: &dyn Model = model.as_ref();
    let mut loss_fn = |x: &Tensor, labels: &[u32], rng: &mut Rng| -> candle_core::Result<Tensor> {
        let batch = augment.apply(x, labels, rng)?;
        let logits = match mixed_precision(cfg) {
            None => model.forward_train(&batch.x, rng)?,
            // bf16: a model on fresh casts of the f32 weights; the loss in f32.
            Some(dtype) => {
                let mut cast = crate::models::build_cast(cfg, &varmap, dtype, &device)?;
                cast.set_grad_checkpointing(t.grad_checkpointing)?;
                cast.forward_train(&batch.x.to_dtype(dtype)?, rng)?
                    .to_dtype(DType::F32)?
            }
        };
        let loss = cross_entropy(&logits, &batch.targets)?;
        if lambda > 0.0 {
            let n = batch.x.dim(0)?;
            let x = match penalty_images {
                0 => batch.x.clone(),
                k => batch.x.narrow(0, 0, k.min(n))?,
            };
            loss + (lee_penalty(
                model,
                &x,
                &t.lee_penalty_transforms,
                cfg.lee.stencil,
                t.lee_penalty_output,
            )? * lambda)?
        } else {
            Ok(loss)
        }
    };
    let mut eval_fn = |finished: bool| {
        let limit = if finished { 0 } else { cfg.eval.limit };
        let inference = crate::models::frozen(cfg, &varmap, &device)?;
        evaluate(
            inference.as_ref(),
            cfg,
            &splits,
            &cfg.eval.splits,
            &cfg.lee.splits,
            limit,
            &spec,
            &device,
        )
    };
    let last = run_stage(
        cfg,
        &stage,
        &varmap,
        &mut opt,
        &train_set,
        &device,
        main_meta.as_ref(),
        &clock,
        &mut loss_fn,
        &mut eval_fn,
    )?;
    Ok(RunSummary {
        run_dir,
        last,
        wall_time_s: clock.seconds(),
    })
}
