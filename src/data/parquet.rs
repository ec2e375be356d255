//! Parquet files in the `datasets` layout (the Hub dataset viewer's conversion, revision
//! `refs/convert/parquet`): each row an Image feature `{bytes: PNG / JPEG, path: string}` and an
//! integer label. Read with the `parquet` crate's row API (no Arrow). Shared by Hub MNIST
//! ([`super::hub_mnist`]) and `data.source = "parquet"` (any image-classification set:
//! [`load`]), whose class names come from the file's `huggingface` metadata (the ClassLabel
//! feature) when it has them.

use super::photos::Photos;
use super::{DataError, Images, Split};
use crate::config::Config;
use crate::hub::{self, HubError, HubSource, RepoKind};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The Parquet conversion branch of a Hub dataset.
pub const REVISION: &str = "refs/convert/parquet";

/// The rows of one file: encoded images, labels, and the label column's class names if the
/// file's `huggingface` metadata declares them.
pub struct Rows {
    pub images: Vec<Vec<u8>>,
    pub labels: Vec<i64>,
    pub class_names: Option<Vec<String>>,
}

/// Every row of `path`: `image.bytes` of the column `image` and the integer column `label`.
pub fn read_rows(path: &Path, image: &str, label: &str) -> Result<Rows, DataError> {
    let corrupt = |message: String| DataError::Corrupt {
        path: path.to_path_buf(),
        message,
    };
    let file = std::fs::File::open(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let reader = SerializedFileReader::new(file).map_err(|e| corrupt(format!("not a Parquet file: {e}")))?;
    let class_names = reader
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|e| e.key == "huggingface")?.value.clone())
        .and_then(|json| class_names(&json, label));
    let rows = reader
        .get_row_iter(None)
        .map_err(|e| corrupt(format!("cannot read rows: {e}")))?;
    let mut out = Rows {
        images: Vec::new(),
        labels: Vec::new(),
        class_names,
    };
    for (index, row) in rows.enumerate() {
        let row = row.map_err(|e| corrupt(format!("row {index}: {e}")))?;
        let (mut bytes, mut value) = (None, None);
        for (name, field) in row.get_column_iter() {
            match field {
                Field::Group(img) if name == image => {
                    bytes = img.get_column_iter().find_map(|(n, f)| match (n.as_str(), f) {
                        ("bytes", Field::Bytes(b)) => Some(b.data().to_vec()),
                        _ => None,
                    })
                }
                Field::Long(v) if name == label => value = Some(*v),
                Field::Int(v) if name == label => value = Some(*v as i64),
                _ => {}
            }
        }
        out.images
            .push(bytes.ok_or_else(|| corrupt(format!("row {index} has no {image}.bytes column")))?);
        out.labels
            .push(value.ok_or_else(|| corrupt(format!("row {index} has no integer {label} column")))?);
    }
    Ok(out)
}

/// The ClassLabel names of column `label` in a `datasets` metadata document
/// (`{"info": {"features": {label: {"names": [...], "_type": "ClassLabel"}}}}`).
fn class_names(json: &str, label: &str) -> Option<Vec<String>> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let names = v.get("info")?.get("features")?.get(label)?.get("names")?.as_array()?;
    names.iter().map(|n| n.as_str().map(String::from)).collect()
}

/// The Parquet files of split `split` of `repo` (config `config`): `<config>/<split>/0000.parquet`,
/// then 0001, … for as long as the Hub (offline: the cache) has them.
pub fn fetch_split(
    repo: &str,
    config: &str,
    split: &str,
    cache_dir: Option<&Path>,
    offline: bool,
) -> Result<Vec<PathBuf>, DataError> {
    let src = HubSource {
        repo,
        kind: RepoKind::Dataset,
        revision: REVISION,
        cache_dir,
        offline,
        endpoint: None,
    };
    let mut files = vec![hub::fetch(&src, &format!("{config}/{split}/0000.parquet"))?];
    loop {
        match hub::fetch(&src, &format!("{config}/{split}/{:04}.parquet", files.len())) {
            Ok(p) => files.push(p),
            Err(HubError::NotCached { .. } | HubError::Download { .. }) => return Ok(files),
        }
    }
}

/// Split `name` ("train", "val", "test" or "ood_<name>") of the `data.parquet` data set: its
/// images held encoded in memory (their Parquet bytes), decoded per batch.
pub(super) fn load(cfg: &Config, name: &str) -> Result<Split, DataError> {
    let p = &cfg.data.parquet;
    let d = &cfg.data;
    let cache = (!d.hub_cache_dir.is_empty()).then(|| Path::new(&d.hub_cache_dir));
    let (repo, split) = match name {
        "train" => (p.repo.as_str(), p.train.as_str()),
        "val" if !p.val.is_empty() => (p.repo.as_str(), p.val.as_str()),
        "test" => (p.repo.as_str(), p.test.as_str()),
        _ => match d.ood.iter().find(|o| format!("ood_{}", o.name) == name) {
            Some(o) if !o.rotate && !o.hub_repo.is_empty() && o.hub_repo != "auto" => {
                (o.hub_repo.as_str(), p.test.as_str())
            }
            Some(o) => return Err(DataError::ParquetOod { name: o.name.clone() }),
            None => {
                return Err(DataError::UnknownSplit {
                    name: name.into(),
                    known: cfg.split_names(),
                })
            }
        },
    };
    let files = fetch_split(repo, &p.config, split, cache, d.offline)?;
    let mut names = Vec::new();
    let mut bytes = Vec::new();
    let mut labels = Vec::new();
    let mut declared = None;
    for f in &files {
        let rows = read_rows(f, &p.image_column, &p.label_column)?;
        let shown = format!("{repo} {}", f.display());
        for (row, (img, label)) in rows.images.into_iter().zip(rows.labels).enumerate() {
            let label = u32::try_from(label).map_err(|_| DataError::Corrupt {
                path: f.clone(),
                message: format!("row {row}: label {label} is negative"),
            })?;
            names.push(format!("{shown} row {row}"));
            bytes.push(Arc::<[u8]>::from(img));
            labels.push(label);
        }
        declared = declared.or(rows.class_names);
    }
    let classes = match declared {
        Some(c) => c,
        // No ClassLabel names: the indices, as many as the model predicts.
        None => (0..cfg.model.num_classes).map(|c| c.to_string()).collect(),
    };
    if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= classes.len()) {
        return Err(DataError::Corrupt {
            path: PathBuf::from(&names[i]),
            message: format!(
                "label {l} is not below the {} classes (the file's ClassLabel names, else model.num_classes)",
                classes.len()
            ),
        });
    }
    eprintln!(
        "{name}: {} images in {} classes from {} Parquet file(s) of {repo} ({}/{split})",
        labels.len(),
        classes.len(),
        files.len(),
        p.config
    );
    let (named, labels) = super::interleave_classes(names.into_iter().zip(bytes).collect(), labels);
    let (names, bytes): (Vec<String>, Vec<Arc<[u8]>>) = named.into_iter().unzip();
    Ok(Split {
        name: name.into(),
        images: Images::Photos(Photos::Encoded { names, bytes }),
        labels,
        classes,
    })
}
