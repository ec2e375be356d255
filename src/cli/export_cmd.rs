//! `liederiv export`: a trained ViT as timm or transformers load it (see `models::export`).

use super::{ExportArgs, ExportFormat};
use crate::config::{Config, WeightFormat};
use crate::models::export::{export_tensors, hf_config, hf_preprocessor, timm_args, timm_config, timm_model};
use crate::report::write_atomic;
use anyhow::{bail, Context};
use std::path::Path;

/// An export goes into a new or empty folder: one that holds anything (an earlier export, a
/// run, files of the user's) is refused before anything is loaded or written, as `train`
/// refuses a folder that holds a run.
fn refuse_if_occupied(out: &Path) -> anyhow::Result<()> {
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        bail!(
            "--out {} is a file, not a folder; export into a new or empty folder",
            out.display()
        );
    }
    let mut names: Vec<String> = std::fs::read_dir(out)
        .with_context(|| format!("reading {}", out.display()))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading {}", out.display()))?;
    if names.is_empty() {
        return Ok(());
    }
    names.sort();
    let shown = names.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    let more = if names.len() > 5 {
        format!(" and {} more", names.len() - 5)
    } else {
        String::new()
    };
    bail!(
        "--out {} already holds files ({shown}{more}); nothing in it was changed. Export into a new or \
         empty folder (an export never overwrites or mixes with other files), or delete these first",
        out.display()
    )
}

pub fn run(args: &ExportArgs, cfg: &Config) -> anyhow::Result<()> {
    let format = match args.format {
        ExportFormat::Timm => WeightFormat::Timm,
        ExportFormat::Hf => WeightFormat::Hf,
    };
    refuse_if_occupied(&args.out)?;
    let weights = args.out.join("model.safetensors");
    let device = candle_core::Device::Cpu;
    let loaded = crate::train::load_for_inference(cfg, args.checkpoint.as_deref(), &device)?;
    eprintln!("export: {}", loaded.source);
    let tensors = export_tensors(cfg, &loaded.varmap, format)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let json = |name: &str, value: serde_json::Value| -> anyhow::Result<()> {
        let path = args.out.join(name);
        write_atomic(&path, (serde_json::to_string_pretty(&value)? + "\n").as_bytes())?;
        println!("wrote {}", path.display());
        Ok(())
    };
    match format {
        WeightFormat::Hf => {
            json("config.json", hf_config(cfg))?;
            json("preprocessor_config.json", hf_preprocessor(cfg))?;
        }
        _ => {
            json("config.json", timm_config(cfg))?;
            json("timm_args.json", timm_args(cfg))?;
        }
    }
    // Written last and atomically: a folder with model.safetensors is a complete export.
    let tmp = crate::runtime::temp_sibling(&weights, "");
    candle_core::safetensors::save(&tensors, &tmp)
        .and_then(|_| std::fs::rename(&tmp, &weights).map_err(candle_core::Error::wrap))
        .with_context(|| format!("writing {}", weights.display()))?;
    println!("wrote {} ({} tensors)", weights.display(), tensors.len());
    let dir = args.out.display();
    match format {
        WeightFormat::Hf => println!(
            "load it: transformers.ViTForImageClassification.from_pretrained(\"{dir}\") \
             (inputs: pixels / 255, normalised by data.mean / data.std, as preprocessor_config.json says)"
        ),
        _ => println!(
            "load it: m = timm.create_model(\"local-dir:{dir}\", pretrained=True) (timm 1.0.31 reads it), or \
             m = timm.create_model(\"{}\", pretrained=False, **json.load(open(\"{dir}/timm_args.json\"))); \
             m.load_state_dict(safetensors.torch.load_file(\"{dir}/model.safetensors\")) \
             (inputs normalised by data.mean = {:?} / data.std = {:?})",
            timm_model(cfg).0,
            cfg.data.mean.0,
            cfg.data.std.0
        ),
    }
    Ok(())
}
