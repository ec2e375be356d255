//! The Hugging Face Hub client: one function, [`fetch`], that returns the local path of one file
//! of a model or dataset repo, downloading it into the standard Hub cache layout
//! (`<cache>/<models|datasets>--owner--name/{blobs,refs,snapshots}`) when it is not there yet.
//!
//! A thin wrapper on hf-hub 1.0's blocking client. hf-hub 1.0 reads no `HF_HUB_OFFLINE`
//! variable, so offline use goes through its local-files-only option ([`HubSource::offline`]).
//! Our machines have no Hub access: a file that is neither cached nor reachable becomes
//! [`HubError::NotCached`], whose message says how to provide it offline.

use hf_hub::{HFClientBuilder, HFError};
use std::path::{Path, PathBuf};

/// Which kind of Hub repo a file lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Dataset,
}

impl RepoKind {
    /// The `--repo-type` value of `huggingface-cli`.
    fn cli_name(self) -> &'static str {
        match self {
            RepoKind::Model => "model",
            RepoKind::Dataset => "dataset",
        }
    }
}

/// Where a file comes from.
#[derive(Clone, Debug)]
pub struct HubSource<'a> {
    /// `owner/name`, e.g. `facebook/vit-mae-base` or `ylecun/mnist`.
    pub repo: &'a str,
    pub kind: RepoKind,
    /// Branch, tag, ref (`refs/convert/parquet`) or 40-hex commit.
    pub revision: &'a str,
    /// Hub cache folder; `None` = hf-hub's default (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
    /// `~/.cache/huggingface/hub`).
    pub cache_dir: Option<&'a Path>,
    /// Never touch the network: only files already in the cache.
    pub offline: bool,
    /// Hub base URL; `None` = hf-hub's default (`$HF_ENDPOINT`, else https://huggingface.co).
    pub endpoint: Option<&'a str>,
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(
        "{file} of the Hub repo {repo} is not in the local cache {cache} and the Hub is unreachable \
         (or offline mode is on). To provide it offline, download it on a machine with internet \
         access (`huggingface-cli download {repo} {file} --repo-type {kind} --revision {revision} \
         --cache-dir <dir>`) and copy <dir> to {cache} (or point the cache folder of the config at \
         it), or point the config at a local file or folder instead of the Hub."
    )]
    NotCached {
        repo: String,
        file: String,
        cache: PathBuf,
        kind: &'static str,
        revision: String,
    },
    #[error("downloading {file} from the Hub repo {repo} failed: {message}")]
    Download {
        repo: String,
        file: String,
        message: String,
    },
}

/// How to recover from a bad file when `path` lies in a Hub cache (`…/<models|datasets>--owner--
/// name/snapshots/<revision>/<file>`, a link into `blobs/`): " It is a cached Hub download:
/// delete …", to append to the error that names it; "" for any other path.
pub fn cache_hint(path: &Path) -> String {
    let parts: Vec<String> = path
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let Some(i) = parts.iter().rposition(|c| c == "snapshots") else {
        return String::new();
    };
    let repo = match i.checked_sub(1).map(|j| parts[j].as_str()) {
        Some(r) if r.starts_with("models--") || r.starts_with("datasets--") => r.to_string(),
        _ => return String::new(),
    };
    let blob = std::fs::read_link(path)
        .ok()
        .map(|target| path.parent().unwrap_or(Path::new("")).join(target))
        .map(|b| format!(" and the blob it links to ({})", b.display()))
        .unwrap_or_default();
    format!(
        " It is a cached Hub download of {repo}: delete it{blob} (or the whole folder of {repo} in the cache), \
         and the next run downloads it again"
    )
}

/// The local path of `filename` in `src`, downloaded into the cache first when needed (and
/// allowed). The returned path is hf-hub's snapshot path (a symlink into `blobs/`).
pub fn fetch(src: &HubSource, filename: &str) -> Result<PathBuf, HubError> {
    let cache = src
        .cache_dir
        .map(Path::to_path_buf)
        .unwrap_or_else(hf_hub::resolve_cache_dir);
    let download_err = |e: HFError| HubError::Download {
        repo: src.repo.to_string(),
        file: filename.to_string(),
        message: e.to_string(),
    };
    let mut builder = HFClientBuilder::new().cache_dir(&cache);
    if let Some(e) = src.endpoint {
        builder = builder.endpoint(e);
    }
    let client = builder.build_sync().map_err(download_err)?;
    let (owner, name) = hf_hub::split_id(src.repo);
    let result = match src.kind {
        RepoKind::Model => client
            .model(owner, name)
            .download_file()
            .filename(filename)
            .revision(src.revision)
            .local_files_only(src.offline)
            .send(),
        RepoKind::Dataset => client
            .dataset(owner, name)
            .download_file()
            .filename(filename)
            .revision(src.revision)
            .local_files_only(src.offline)
            .send(),
    };
    result.map_err(|e| match e {
        // Offline and not cached, or the network failed and hf-hub's own cache fallback found
        // nothing: both mean "provide the file yourself".
        HFError::LocalEntryNotFound { .. } | HFError::Request { .. } => HubError::NotCached {
            repo: src.repo.to_string(),
            file: filename.to_string(),
            cache: cache.clone(),
            kind: src.kind.cli_name(),
            revision: src.revision.to_string(),
        },
        other => download_err(other),
    })
}
