//! `liederiv zoo`'s measurements: every model of a zoo config on the same images (its `[zoo]`
//! split, first `limit`), error and per-image LEE per transform, and optionally the layerwise
//! decomposition, in units of one model × one batch of `lee.batch_size` images.
//!
//! Units are the scale-out: `--shard K/N` measures units K−1, K−1+N, … and writes each as its own
//! file (`units/<model>/<first image>.json`, written atomically; a unit whose file exists is not
//! measured again, so a preempted shard resumes). [`merge`] reads every unit of every model in
//! image order, so N shards give exactly the numbers of one process: a unit's per-image values do
//! not depend on which process measured it, and the sums run in the same order.

use crate::config::{Config, InitWeights, ZooModel};
use crate::data;
use crate::jvp::StepKind;
use crate::lie::layerwise::{decompose, exact_sq_norms};
use crate::lie::{lee_per_image, MeanStderr};
use crate::models::frozen;
use crate::progress::{self, Progress};
use crate::report::write_atomic;
use crate::report::zoo::{LayerwiseResult, ModelResult};
use crate::train::load_for_inference;
use anyhow::{bail, Context};
use candle_core::{DType, Device, D};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One model of the zoo with its resolved config.
#[derive(Debug)]
pub struct ZooEntry {
    pub spec: ZooModel,
    pub cfg: Config,
}

/// The zoo's models, the images they share and where the results go.
#[derive(Debug)]
pub struct Plan {
    pub entries: Vec<ZooEntry>,
    /// Images measured per model.
    pub n_images: usize,
    /// Images per unit.
    pub batch: usize,
    pub out: PathBuf,
}

/// Shard `k` of `n` (1-based), as `--shard K/N` writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub k: usize,
    pub n: usize,
}

impl Shard {
    pub const ALL: Shard = Shard { k: 1, n: 1 };

    /// `"K/N"` with 1 ≤ K ≤ N.
    pub fn parse(s: &str) -> anyhow::Result<Shard> {
        let parsed = s
            .split_once('/')
            .and_then(|(k, n)| Some((k.trim().parse::<usize>().ok()?, n.trim().parse::<usize>().ok()?)));
        match parsed {
            Some((k, n)) if n >= 1 && (1..=n).contains(&k) => Ok(Shard { k, n }),
            _ => bail!("--shard {s:?}: expected K/N with 1 ≤ K ≤ N, e.g. --shard 3/8 (the third of eight shards)"),
        }
    }

    fn owns(&self, unit: usize) -> bool {
        unit % self.n == self.k - 1
    }
}

/// Resolve every model's config (the zoo config at `path`, the model's `set`, then the command
/// line's `overrides`), so that a bad model entry fails before anything is measured.
pub fn plan(zoo: &Config, path: &Path, overrides: &[String]) -> anyhow::Result<Plan> {
    let z = &zoo.zoo;
    if z.models.is_empty() {
        bail!(
            "{}: no models to measure; add [[zoo.models]] entries (name, family, set = [\"model.kind=...\", ...])",
            path.display()
        );
    }
    let mut entries = Vec::with_capacity(z.models.len());
    for m in &z.models {
        // Every model sees the zoo's images and measurements: its own overrides may shape the
        // model, its weights and its preprocessing only.
        if let Some(bad) = m.set.iter().find(|s| {
            let key = s.split('=').next().unwrap_or("").trim();
            ![
                "model.",
                "init.",
                "data.mean",
                "data.std",
                "data.image_size",
                "data.channels",
                "data.interpolation",
                "data.crop_pct",
            ]
            .iter()
            .any(|p| key.starts_with(p))
                && key != "seed"
        }) {
            bail!(
                "zoo model {:?}: `set` entry {bad:?} changes what every model shares; a model's overrides \
                 may set model.*, init.*, seed and its preprocessing (data.mean, data.std, data.image_size, \
                 data.channels, data.interpolation, data.crop_pct); put the rest in the zoo config itself",
                m.name
            );
        }
        let mut sets = m.set.clone();
        sets.extend_from_slice(overrides);
        let cfg = Config::resolve(Some(path), &sets).with_context(|| format!("zoo model {:?}", m.name))?;
        entries.push(ZooEntry { spec: m.clone(), cfg });
    }
    let first = &entries[0].cfg;
    let split = data::load_split(first, &z.split).with_context(|| format!("loading split {}", z.split))?;
    let n_images = if z.limit == 0 {
        split.len()
    } else {
        z.limit.min(split.len())
    };
    if n_images == 0 {
        bail!("zoo: split {:?} has no images to measure", z.split);
    }
    let out = if z.out.is_empty() {
        zoo.run_dir()
    } else {
        PathBuf::from(&z.out)
    };
    let batch = first.lee.batch_size.max(1);
    Ok(Plan {
        entries,
        n_images,
        batch,
        out,
    })
}

impl Plan {
    fn chunks(&self) -> usize {
        self.n_images.div_ceil(self.batch)
    }

    /// Units in order: model by model, images in order.
    fn units(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        let chunks = self.chunks();
        (0..self.entries.len() * chunks).map(move |u| (u, u / chunks, u % chunks))
    }

    /// A digest of everything a unit of `model` depends on: the model's resolved config (its
    /// architecture, weights, preprocessing, the split, the measurements), its checkpoint file
    /// (path, size, modification time), the images per unit and the images measured.
    fn fingerprint(&self, model: usize) -> String {
        use sha2::Digest;
        let entry = &self.entries[model];
        let mut cfg = entry.cfg.clone();
        cfg.zoo.models.clear();
        cfg.zoo.out.clear();
        let ckpt = &entry.spec.checkpoint;
        let stamp = std::fs::metadata(ckpt)
            .ok()
            .map(|m| format!("{} {:?}", m.len(), m.modified().ok()))
            .unwrap_or_default();
        let text = format!(
            "{}\ncheckpoint {ckpt} {stamp}\nbatch {} images {}",
            cfg.to_toml(),
            self.batch,
            self.n_images
        );
        hex::encode(sha2::Sha256::digest(text.as_bytes()))
    }

    /// The unit's file, if it exists and was measured for this plan.
    fn read_unit(&self, model: usize, chunk: usize, fingerprint: &str) -> anyhow::Result<Option<Unit>> {
        let path = self.unit_path(model, chunk);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let unit: Unit = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a zoo unit (delete it and run its shard again)",
                path.display()
            )
        })?;
        let start = chunk * self.batch;
        let n = self.batch.min(self.n_images - start);
        let fits = unit.fingerprint == fingerprint
            && unit.start == start
            && unit.labels.len() == n
            && unit.predictions.len() == n
            && unit.lee.iter().all(|(_, v)| v.len() == n)
            && unit.layerwise.iter().all(|l| l.end_to_end.len() == n);
        Ok(fits.then_some(unit))
    }

    fn unit_path(&self, model: usize, chunk: usize) -> PathBuf {
        self.out
            .join("units")
            .join(&self.entries[model].spec.name)
            .join(format!("{:07}.json", chunk * self.batch))
    }
}

/// The per-image measurements of one model on one batch of images.
#[derive(Debug, Serialize, Deserialize)]
pub struct Unit {
    pub model: String,
    /// What the unit was measured for ([`Plan::fingerprint`]): a unit of another configuration
    /// is measured again, never merged.
    pub fingerprint: String,
    /// The device and instruction set that measured it (units merge bit-identically only across
    /// machines of one kind).
    pub machine: String,
    /// Index of the first image in the split.
    pub start: usize,
    /// What was measured ("checkpoint …", "the config's initial weights …").
    pub source: String,
    pub parameters: usize,
    pub labels: Vec<u32>,
    pub predictions: Vec<u32>,
    /// Per transform (in `lee.transforms` order), the LEE of each image.
    pub lee: Vec<(String, Vec<f64>)>,
    pub layerwise: Vec<LayerwiseUnit>,
}

/// The layerwise decomposition of one transform on a unit's images: per step and image,
/// ‖J_{N:i+1}·L_X f_i‖² / K, and per image ‖L_X out‖² / K.
#[derive(Debug, Serialize, Deserialize)]
pub struct LayerwiseUnit {
    pub transform: String,
    pub steps: Vec<(String, StepKind)>,
    pub contributions: Vec<Vec<f64>>,
    pub end_to_end: Vec<f64>,
}

/// The model a shard is measuring, with its images.
struct Loaded {
    index: usize,
    model: Box<dyn crate::models::Model>,
    split: data::Split,
    source: String,
    parameters: usize,
}

/// Measure this shard's units that have no file for this configuration yet. Returns (measured,
/// already there).
pub fn run_shard(plan: &Plan, shard: Shard, device: &Device, show_progress: bool) -> anyhow::Result<(usize, usize)> {
    let mine: Vec<(usize, usize, usize)> = plan.units().filter(|(u, _, _)| shard.owns(*u)).collect();
    let prints: Vec<String> = (0..plan.entries.len()).map(|m| plan.fingerprint(m)).collect();
    let mut todo = Vec::new();
    for unit @ (_, m, c) in &mine {
        // A unit of another configuration (or a damaged file) is measured again.
        if !matches!(plan.read_unit(*m, *c, &prints[*m]), Ok(Some(_))) {
            todo.push(unit);
        }
    }
    let done = mine.len() - todo.len();
    let bar = Progress::new(
        progress::Mode::detect(show_progress),
        &format!("zoo shard {}/{}", shard.k, shard.n),
        "units",
        mine.len() as u64,
        done as u64,
        "{prefix} [{bar:30}] {pos}/{len} units  {msg}  ETA {eta}",
    );
    let clock = Instant::now();
    let mut images = 0usize;
    let mut current: Option<Loaded> = None;
    for &&(_, m, c) in &todo {
        let entry = &plan.entries[m];
        if current.as_ref().is_none_or(|l| l.index != m) {
            let cfg = &entry.cfg;
            let (varmap, source) = load(entry, device).with_context(|| format!("zoo model {:?}", entry.spec.name))?;
            let parameters = {
                let data = varmap
                    .data()
                    .lock()
                    .map_err(|_| anyhow::anyhow!("the variable map's lock is poisoned"))?;
                data.iter()
                    .filter(|(name, _)| !crate::models::conv::is_buffer(name))
                    .map(|(_, v)| v.as_tensor().elem_count())
                    .sum()
            };
            let model = frozen(cfg, &varmap, device)?;
            let split =
                data::load_split(cfg, &cfg.zoo.split).with_context(|| format!("loading split {}", cfg.zoo.split))?;
            bar.println(&format!("zoo: {} = {source}", entry.spec.name));
            current = Some(Loaded {
                index: m,
                model,
                split,
                source,
                parameters,
            });
        }
        let Some(l) = current.as_ref() else {
            unreachable!("a model was just loaded")
        };
        let unit = measure_unit(
            plan,
            entry,
            l.model.as_ref(),
            &l.split,
            c,
            (&l.source, &prints[m]),
            l.parameters,
            device,
        )
        .with_context(|| format!("zoo model {:?}, images from {}", entry.spec.name, c * plan.batch))?;
        images += unit.labels.len();
        let path = plan.unit_path(m, c);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        write_atomic(&path, serde_json::to_string(&unit)?.as_bytes())?;
        bar.set_message(format!(
            "{}  {:.1} img/s",
            entry.spec.name,
            images as f64 / clock.elapsed().as_secs_f64().max(1e-9)
        ));
        bar.inc(1);
    }
    bar.finish();
    Ok((todo.len(), done))
}

/// A zoo model's variables: its `checkpoint` (one of our runs'), else its config's initial
/// weights (a timm file or Hub repo, or random). Never a run folder's checkpoint found by name:
/// every model of a zoo shares the zoo config's name.
fn load(entry: &ZooEntry, device: &Device) -> anyhow::Result<(candle_nn::VarMap, String)> {
    let cfg = &entry.cfg;
    if !entry.spec.checkpoint.is_empty() {
        let loaded = load_for_inference(cfg, Some(Path::new(&entry.spec.checkpoint)), device)?;
        return Ok((loaded.varmap, loaded.source));
    }
    let (varmap, _) = crate::models::build_model(cfg, device)?;
    let i = &cfg.init;
    let source = match i.weights {
        InitWeights::File => format!("{} ({} layout)", i.file, i.format),
        InitWeights::Hub => format!("Hub repo {} ({} layout)", i.hub_repo, i.format),
        InitWeights::Random => format!("random initial weights (seed {})", cfg.seed),
        InitWeights::Pretrain => bail!(
            "init.weights = \"pretrain\" names a run's own MAE stage; give the fine-tuned run's \
             checkpoint = \".../checkpoint.safetensors\" instead"
        ),
    };
    Ok((varmap, source))
}

#[allow(clippy::too_many_arguments)]
fn measure_unit(
    plan: &Plan,
    entry: &ZooEntry,
    model: &dyn crate::models::Model,
    split: &data::Split,
    chunk: usize,
    (source, fingerprint): (&str, &str),
    parameters: usize,
    device: &Device,
) -> anyhow::Result<Unit> {
    let cfg = &entry.cfg;
    let l = &cfg.lee;
    let start = chunk * plan.batch;
    let idx: Vec<usize> = (start..(start + plan.batch).min(plan.n_images)).collect();
    let (x, labels) = data::batch(split, &idx, &cfg.data, device)?;
    let predictions = model.forward(&x)?.argmax(D::Minus1)?.to_vec1::<u32>()?;
    let lee = lee_per_image(model, &x, &l.transforms, l.stencil, l.statistic, l.output)?;
    let mut layerwise = Vec::new();
    for &tr in &cfg.zoo.layerwise {
        let d = decompose(model, &x, tr, l.stencil, l.output)?;
        let k = d.end_to_end.dim(D::Minus1)? as f64;
        let per_image = |t: candle_core::Tensor| -> candle_core::Result<candle_core::Tensor> { t / k };
        layerwise.push(LayerwiseUnit {
            transform: tr.name().to_string(),
            steps: d.steps.iter().map(|s| (s.name.clone(), s.kind)).collect(),
            contributions: per_image(exact_sq_norms(&d.contributions)?)?
                .to_dtype(DType::F64)?
                .to_vec2()?,
            end_to_end: per_image(d.end_to_end.sqr()?.sum(D::Minus1)?)?
                .to_dtype(DType::F64)?
                .to_vec1()?,
        });
    }
    // JSON has no NaN / ∞: a unit holding one could never be merged.
    let finite = lee.iter().flatten().all(|v| v.is_finite())
        && layerwise.iter().all(|l| {
            l.end_to_end
                .iter()
                .chain(l.contributions.iter().flatten())
                .all(|v| v.is_finite())
        });
    if !finite {
        bail!("the LEE is not finite (NaN or ∞) on these images: the model's outputs overflow (try runtime.precision f32)");
    }
    Ok(Unit {
        model: entry.spec.name.clone(),
        fingerprint: fingerprint.to_string(),
        machine: format!("{:?} {}", device, crate::kernels::isa()),
        start,
        source: source.to_string(),
        parameters,
        labels: labels.to_dtype(DType::U32)?.to_vec1()?,
        predictions,
        lee: l.transforms.iter().map(|t| t.name().to_string()).zip(lee).collect(),
        layerwise,
    })
}

/// Read every unit of every model (in image order) and reduce them. A missing unit is an error
/// naming it: run its shard (again) first.
pub fn merge(plan: &Plan) -> anyhow::Result<Vec<ModelResult>> {
    let chunks = plan.chunks();
    let mut all = Vec::with_capacity(plan.entries.len());
    let mut missing = Vec::new();
    for (m, entry) in plan.entries.iter().enumerate() {
        let print = plan.fingerprint(m);
        let mut units = Vec::with_capacity(chunks);
        for c in 0..chunks {
            match plan.read_unit(m, c, &print)? {
                Some(u) => units.push(u),
                None => missing.push(format!(
                    "{} images from {} (unit {})",
                    entry.spec.name,
                    c * plan.batch,
                    m * chunks + c
                )),
            }
        }
        all.push(units);
    }
    if !missing.is_empty() {
        bail!(
            "cannot merge {}: {} of {} units have not been measured for this configuration ({}{}); run the \
             shards that own them (unit u belongs to shard (u mod N) + 1 of N; a unit measured for another \
             configuration is measured again) and merge again",
            plan.out.display(),
            missing.len(),
            plan.entries.len() * chunks,
            missing[..missing.len().min(3)].join(", "),
            if missing.len() > 3 { ", …" } else { "" }
        );
    }
    let machines: std::collections::BTreeSet<&str> = all.iter().flatten().map(|u| u.machine.as_str()).collect();
    if machines.len() > 1 {
        eprintln!(
            "zoo: warning: the units were measured on different kinds of machine ({}); the numbers agree only \
             to rounding, not to the bit",
            machines.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    plan.entries
        .iter()
        .zip(&all)
        .map(|(entry, units)| reduce(entry, units))
        .collect()
}

fn reduce(entry: &ZooEntry, units: &[Unit]) -> anyhow::Result<ModelResult> {
    let first = &units[0];
    let mut lee: Vec<(String, MeanStderr)> = first.lee.iter().map(|(t, _)| (t.clone(), MeanStderr::new())).collect();
    let mut layerwise: Vec<LayerwiseResult> = first
        .layerwise
        .iter()
        .map(|l| LayerwiseResult {
            transform: l.transform.clone(),
            end_to_end: MeanStderr::new(),
            steps: l
                .steps
                .iter()
                .map(|(s, k)| (s.clone(), *k, MeanStderr::new()))
                .collect(),
        })
        .collect();
    let (mut wrong, mut images) = (0usize, Vec::new());
    for u in units {
        let same = u.lee.iter().map(|(t, _)| t).eq(lee.iter().map(|(t, _)| t))
            && u.layerwise
                .iter()
                .map(|l| &l.transform)
                .eq(layerwise.iter().map(|l| &l.transform));
        if !same {
            bail!(
                "zoo model {:?}: its units were measured with different transforms (images from {}); \
                 delete its units folder and measure again",
                entry.spec.name,
                u.start
            );
        }
        for (i, (&y, &p)) in u.labels.iter().zip(&u.predictions).enumerate() {
            wrong += usize::from(y != p);
            images.push((y, p, u.lee.iter().map(|(_, v)| v[i]).collect()));
        }
        for ((_, acc), (_, v)) in lee.iter_mut().zip(&u.lee) {
            acc.extend(v.iter().copied());
        }
        for (acc, l) in layerwise.iter_mut().zip(&u.layerwise) {
            acc.end_to_end.extend(l.end_to_end.iter().copied());
            for ((_, _, s), v) in acc.steps.iter_mut().zip(&l.contributions) {
                s.extend(v.iter().copied());
            }
        }
    }
    let n = images.len();
    Ok(ModelResult {
        name: entry.spec.name.clone(),
        family: entry.spec.family.clone(),
        kind: entry.cfg.model.kind.name().to_string(),
        source: first.source.clone(),
        parameters: first.parameters,
        split: entry.cfg.zoo.split.clone(),
        n,
        error_pct: 100.0 * wrong as f64 / n.max(1) as f64,
        lee,
        layerwise,
        images,
    })
}
