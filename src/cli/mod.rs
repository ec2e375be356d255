//! The command line: `liederiv train | eval | lee | data | export | zoo | report`. Parsing (clap) and config
//! resolution live here; each command's body is in its own file. Errors from every command end
//! up in [`main`], which prints the whole context chain once and sets the exit code.

pub mod data_cmd;
pub mod eval_cmd;
pub mod export_cmd;
pub mod lee_cmd;
pub mod report_cmd;
pub mod train_cmd;
pub mod zoo_cmd;

use crate::config::Config;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "liederiv",
    version,
    about = "Fine-tune ViTs and equivariant CNNs on rotated MNIST and measure learned equivariance with the Lie derivative."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command takes: the config file and its overrides.
#[derive(Args, Debug, Clone)]
pub struct ConfigArgs {
    /// TOML config file (see configs/). Without it the built-in defaults are used.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Override one config value, e.g. `--set train.base_lr=5e-4 --set model.kind=cnn`
    /// (repeatable; applied after the file, in order; unknown keys and wrong types are errors).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Print the fully resolved config and exit without doing any work.
    #[arg(long)]
    pub dry_run: bool,
}

impl ConfigArgs {
    /// Read, override and validate the config (errors name the key, file and line).
    pub fn resolve(&self) -> anyhow::Result<Config> {
        self.resolve_with(&[])
    }

    /// As [`ConfigArgs::resolve`], with a command's own flags as further overrides (after `--set`).
    pub fn resolve_with(&self, flags: &[String]) -> anyhow::Result<Config> {
        let all: Vec<String> = self.overrides.iter().chain(flags).cloned().collect();
        let cfg = Config::resolve(self.config.as_deref(), &all)?;
        // Process-wide, before any model is built: every command runs the kernels it names.
        crate::kernels::set_portable(cfg.runtime.kernels == crate::config::Kernels::Portable);
        Ok(cfg)
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train (optionally MAE-pretrain, then fine-tune) a model, logging accuracy and LEE on
    /// train / test / OOD splits to `<output.dir>/<name>/`.
    Train(TrainArgs),
    /// Loss, accuracy and LEE per split for a checkpoint (or the config's initial weights).
    Eval(EvalArgs),
    /// Measure the local equivariance error (paper Eq. 4) of a model, optionally layerwise.
    Lee(LeeArgs),
    /// Build or inspect the MNIST-rot and OOD sets.
    Data(DataArgs),
    /// Write a trained ViT in timm's or transformers' layout, loadable there without conversion.
    Export(ExportArgs),
    /// Measure a zoo of models on the same images: error and LEE per model, tables, the paper's
    /// Figure-1 view and layerwise bars; `--shard K/N` splits the work across processes.
    Zoo(ZooArgs),
    /// Tables and plots from finished runs.
    Report(ReportArgs),
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub cfg: ConfigArgs,
    /// Continue the run in `<output.dir>/<name>/` from its last checkpoint.
    #[arg(long, conflicts_with = "overwrite")]
    pub resume: bool,
    /// Delete the run already in `<output.dir>/<name>/` and start over (without it, or
    /// `--resume`, a folder that holds a run is refused and left as it is).
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub cfg: ConfigArgs,
    /// Checkpoint (`.safetensors` with its `.json` sidecar); default: the one in the config's run
    /// directory, else the config's initial weights.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Comma-separated splits (train, val, test, ood_<name>); default: eval.splits.
    #[arg(long, value_delimiter = ',')]
    pub splits: Vec<String>,
    /// Use only the first N images of each split (0 = all).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Write one CSV row per image: split, index, label, predicted class, logits.
    #[arg(long)]
    pub predictions: Option<PathBuf>,
    /// Error and true-class probability with every image rotated by a further θ, for θ from
    /// START to STOP (exclusive) every STEP degrees, e.g. `0:360:5`: a table, the run folder's
    /// angles.csv and angles.{png,svg}.
    #[arg(long, value_name = "START:STOP:STEP", value_parser = parse_angles)]
    pub angles: Option<Angles>,
    /// Also write the results as JSON: per split its n, loss, accuracy and LEE, and with
    /// `--angles` an "angles" list of the curve's points (split, degrees, n, error,
    /// true_class_prob), as in angles.csv.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Evaluate `--checkpoint` as a run's final evaluation (all of eval.splits, LEE on
    /// lee.splits) and write it as the config's run folder (config.toml, a one-record
    /// metrics.jsonl at the checkpoint's step, summary.json), for `liederiv report` to table
    /// beside trained runs: an evaluation-only row (e.g. a trained model wrapped with
    /// `model.average_rotations`). Refused when that folder exists.
    #[arg(long, requires = "checkpoint", conflicts_with_all = ["splits", "limit", "angles", "predictions"])]
    pub as_run: bool,
}

#[derive(Args, Debug)]
pub struct LeeArgs {
    #[command(flatten)]
    pub cfg: ConfigArgs,
    /// Checkpoint to measure; default: the one in the config's run directory, else the model as
    /// the config initialises it.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Comma-separated transforms; default: lee.transforms.
    #[arg(long, value_delimiter = ',')]
    pub transforms: Vec<String>,
    /// Comma-separated splits; default: lee.splits.
    #[arg(long, value_delimiter = ',')]
    pub splits: Vec<String>,
    /// Images per split; default: lee.limit.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Pixel derivative: central | forward | spectral; default: lee.stencil.
    #[arg(long)]
    pub stencil: Option<String>,
    /// sq = (1/K)Σ(L_X p_k)² (paper) | abs = (1/K)Σ|L_X p_k| (reference CSVs); default: lee.statistic.
    #[arg(long)]
    pub statistic: Option<String>,
    /// What is differentiated: probs (paper) | logits | features (the pooled representation the
    /// head reads) | tokens (the ViT's last patch tokens); default: lee.output.
    #[arg(long)]
    pub output: Option<String>,
    /// Decompose the Lie derivative over the network's steps (paper Eq. 6, Figure 4).
    #[arg(long)]
    pub layerwise: bool,
    /// Comma-separated metrics: lee, consistency, eq_t, eq_t_frac, eq_r, sample.
    #[arg(long, value_delimiter = ',')]
    pub metrics: Vec<String>,
    /// Write the results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// The angles of `eval --angles`, in degrees.
#[derive(Clone, Debug)]
pub struct Angles(pub Vec<f64>);

/// `START:STOP:STEP` in degrees → the angles START, START+STEP, … below STOP (the parser of
/// `eval --angles`; its error is clap's message for a bad value).
pub fn parse_angles(text: &str) -> Result<Angles, String> {
    let parts: Vec<f64> = text
        .split(':')
        .map(|p| p.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{text:?}: {e}; expected START:STOP:STEP in degrees, e.g. 0:360:5"))?;
    match parts[..] {
        [start, stop, step] if step > 0.0 && stop > start && (stop - start) / step <= 10_000.0 => {
            let n = ((stop - start) / step).ceil() as usize;
            Ok(Angles((0..n).map(|i| start + step * i as f64).filter(|d| *d < stop).collect()))
        }
        _ => Err(format!(
            "{text:?}: expected START:STOP:STEP in degrees with STEP > 0, STOP > START and at most 10000 angles, e.g. 0:360:5"
        )),
    }
}

impl LeeArgs {
    /// The flags that set `[lee]` fields, as the `--set` overrides they stand for: the config
    /// parses and checks them like any other value.
    pub fn overrides(&self) -> Vec<String> {
        let list = |v: &[String]| {
            format!(
                "[{}]",
                v.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ")
            )
        };
        let mut out = Vec::new();
        if !self.transforms.is_empty() {
            out.push(format!("lee.transforms={}", list(&self.transforms)));
        }
        if !self.splits.is_empty() {
            out.push(format!("lee.splits={}", list(&self.splits)));
        }
        if let Some(n) = self.limit {
            out.push(format!("lee.limit={n}"));
        }
        if let Some(s) = &self.stencil {
            out.push(format!("lee.stencil={s:?}"));
        }
        if let Some(s) = &self.statistic {
            out.push(format!("lee.statistic={s:?}"));
        }
        if let Some(s) = &self.output {
            out.push(format!("lee.output={s:?}"));
        }
        out
    }
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    pub cfg: ConfigArgs,
    /// Checkpoint to export; default: the one in the config's run directory.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Key layout: timm (`timm.create_model` + `load_state_dict`) or hf
    /// (`ViTForImageClassification.from_pretrained`).
    #[arg(long, value_enum)]
    pub format: ExportFormat,
    /// Folder to write model.safetensors and its config into: a new or empty one (a folder that
    /// holds files is refused and left as it is).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct ZooArgs {
    /// The zoo config (`[zoo]` with `[[zoo.models]]`; see configs/zoo_example.toml). `--set`
    /// applies to every model, after its own overrides.
    #[command(flatten)]
    pub cfg: ConfigArgs,
    /// Measure only shard K of N (1 ≤ K ≤ N) of the model × image units, writing them under
    /// `<out>/units/`; merge with `--merge` once all shards have run.
    #[arg(long, value_name = "K/N", conflicts_with = "merge")]
    pub shard: Option<String>,
    /// Merge the units every shard wrote into the results (no measuring).
    #[arg(long)]
    pub merge: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ExportFormat {
    Timm,
    Hf,
}

#[derive(Args, Debug)]
pub struct DataArgs {
    #[command(subcommand)]
    pub action: DataAction,
}

#[derive(Subcommand, Debug)]
pub enum DataAction {
    /// Build (or reuse from the cache) every split and print a summary.
    Prepare(DataInfoArgs),
    /// Print size, hash and class counts of every split (building it first if needed).
    Info(DataInfoArgs),
}

#[derive(Args, Debug)]
pub struct DataInfoArgs {
    #[command(flatten)]
    pub cfg: ConfigArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Run directories (each holding metrics.jsonl).
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Write a markdown table of the final metrics here.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Published numbers to print beside ours, labelled as theirs: a TOML file with `source` and
    /// `[[row]]` entries `model`, `test_error_pct`, optional `run` (our run's name), e.g.
    /// experiments/table1/paper.toml; optional `[[comparison]]` entries `a`, `b` (our row names)
    /// and `label` add the differences a − b over seeds with 95% Welch t intervals (`paired =
    /// true`: paired by seed, the paired t interval).
    #[arg(long)]
    pub paper: Option<PathBuf>,
}

/// Parse the command line, run the command, print errors once with their context chain.
pub fn main() -> ExitCode {
    crate::runtime::tune_process();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

/// Print the resolved config for `--dry-run`; returns true when the command should stop.
fn dry_run(args: &ConfigArgs, cfg: &Config) -> bool {
    if args.dry_run {
        print!("{}", cfg.to_toml());
    }
    args.dry_run
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train(a) => {
            let cfg = a.cfg.resolve()?;
            if dry_run(&a.cfg, &cfg) {
                return Ok(());
            }
            train_cmd::run(&a, &cfg)
        }
        Command::Eval(a) => {
            let cfg = a.cfg.resolve()?;
            if dry_run(&a.cfg, &cfg) {
                return Ok(());
            }
            eval_cmd::run(&a, &cfg)
        }
        Command::Lee(a) => {
            let cfg = a.cfg.resolve_with(&a.overrides())?;
            if dry_run(&a.cfg, &cfg) {
                return Ok(());
            }
            lee_cmd::run(&cfg, &a)
        }
        Command::Data(a) => {
            let (args, prepare) = match &a.action {
                DataAction::Prepare(x) => (x, true),
                DataAction::Info(x) => (x, false),
            };
            let cfg = args.cfg.resolve()?;
            if dry_run(&args.cfg, &cfg) {
                return Ok(());
            }
            data_cmd::run(&cfg, prepare, args.json)
        }
        Command::Export(a) => {
            let cfg = a.cfg.resolve()?;
            if dry_run(&a.cfg, &cfg) {
                return Ok(());
            }
            export_cmd::run(&a, &cfg)
        }
        Command::Zoo(a) => {
            let cfg = a.cfg.resolve()?;
            if dry_run(&a.cfg, &cfg) {
                return Ok(());
            }
            zoo_cmd::run(&a, &cfg)
        }
        Command::Report(a) => report_cmd::run(&a),
    }
}
