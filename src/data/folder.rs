//! `data.source = "folder"`: photos in torchvision's `ImageFolder` layout. `data.folder` holds
//! `train/`, `test/` and optionally `val/`, each with one subfolder per class; the class index is
//! the position of the folder name among train's sorted class folders (as `ImageFolder`), and
//! the files of a class are every PNG / JPEG below its folder, in sorted path order. Or a split
//! is a flat folder with a labels CSV beside it (`train/` and `train.csv`: `file,label` rows),
//! the classes then being train's sorted distinct labels. The images are listed with the classes
//! interleaved ([`super::interleave_classes`]), so that the first N of a split (`eval.limit`,
//! `lee.limit`, `data.train_limit`, an OOD set's `limit`) cover every class alike. An OOD set
//! (`[[data.ood]]`, `path` relative to `data.folder` or absolute) is one more such split folder.

use super::photos::{PhotoError, Photos};
use super::{DataError, Images, Split};
use crate::config::Config;
use std::path::{Path, PathBuf};

/// The file endings read (what [`super::preprocess::decode`] decodes), lower case.
const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// Split `name` ("train", "val", "test" or "ood_<name>") of the folder, its files listed (not read).
pub(super) fn load(cfg: &Config, name: &str) -> Result<Split, DataError> {
    let base = PathBuf::from(&cfg.data.folder);
    let dir = split_dir(cfg, name)?;
    let (listed, ignored) = list(&dir)?;
    let classes = match name {
        "train" => classes_of(&listed),
        _ => train_classes(&base.join("train"))?,
    };
    let mut files = Vec::with_capacity(listed.len());
    let mut labels = Vec::with_capacity(listed.len());
    for (file, class) in listed {
        let Some(label) = classes.iter().position(|c| *c == class) else {
            return Err(PhotoError::UnknownClass {
                path: dir,
                class,
                train: classes,
            }
            .into());
        };
        files.push(file.strip_prefix(&base).map(Path::to_path_buf).unwrap_or(file));
        labels.push(label as u32);
    }
    let (files, labels) = super::interleave_classes(files, labels);
    eprintln!(
        "{name}: {} images in {} classes from {}{}",
        files.len(),
        classes.len(),
        dir.display(),
        match ignored.first() {
            Some(f) => format!(
                "; ignored {} files that are not PNG / JPEG (e.g. {})",
                ignored.len(),
                f.display()
            ),
            None => String::new(),
        }
    );
    Ok(Split {
        name: name.into(),
        images: Images::Photos(Photos::Files { base, files }),
        labels,
        classes,
    })
}

/// Train's sorted classes, without checking its files (the class folders, or the CSV's labels).
fn train_classes(train: &Path) -> Result<Vec<String>, PhotoError> {
    let csv = csv_of(train);
    if !csv.is_file() {
        return class_folders(train);
    }
    let labels = csv_rows(&csv)?.into_iter().map(|(_, _, label)| (PathBuf::new(), label));
    Ok(classes_of(&labels.collect::<Vec<_>>()))
}

/// `<dir>.csv`, beside the split folder (`train` → `train.csv`, `cifar10.1` → `cifar10.1.csv`).
fn csv_of(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".csv");
    dir.with_file_name(name)
}

/// A split's images, each with its class name.
type Listing = Vec<(PathBuf, String)>;

/// The sorted distinct classes of a listing.
fn classes_of(listed: &[(PathBuf, String)]) -> Vec<String> {
    let mut c: Vec<String> = listed.iter().map(|(_, class)| class.clone()).collect();
    c.sort();
    c.dedup();
    c
}

/// Every image of split folder `dir` with its class name, and the files ignored: from
/// `<dir>.csv` when it exists (a flat folder and a labels CSV), else the class subfolders.
fn list(dir: &Path) -> Result<(Listing, Vec<PathBuf>), PhotoError> {
    let csv = csv_of(dir);
    if csv.is_file() {
        return Ok((read_csv(&csv, dir)?, Vec::new()));
    }
    let mut listed = Vec::new();
    let mut ignored = Vec::new();
    for class in class_folders(dir)? {
        let mut files = Vec::new();
        walk(&dir.join(&class), &mut files, &mut ignored)?;
        if files.is_empty() {
            return Err(PhotoError::EmptyClass {
                path: dir.into(),
                class,
            });
        }
        listed.extend(files.into_iter().map(|f| (f, class.clone())));
    }
    Ok((listed, ignored))
}

/// `<split>.csv`: a header `file,label`, then one `file,label` row per image, the file relative
/// to the split's folder and the label a class name (no quoting: the label is what follows the
/// last comma). Every listed file must exist.
fn read_csv(csv: &Path, dir: &Path) -> Result<Listing, PhotoError> {
    let mut out = Vec::new();
    for (line, file, label) in csv_rows(csv)? {
        let path = dir.join(&file);
        if !path.is_file() {
            return Err(PhotoError::Csv {
                path: csv.into(),
                line,
                message: format!("{} does not exist", path.display()),
            });
        }
        out.push((path, label));
    }
    Ok(out)
}

/// The rows `(line number, file, label)` of a labels CSV (a leading byte-order mark, as
/// spreadsheets write, is skipped).
fn csv_rows(csv: &Path) -> Result<Vec<(usize, String, String)>, PhotoError> {
    let text = std::fs::read_to_string(csv).map_err(|source| PhotoError::Read {
        path: csv.into(),
        source,
    })?;
    let bad = |line: usize, message: String| PhotoError::Csv {
        path: csv.into(),
        line,
        message,
    };
    let text = text.trim_start_matches('\u{feff}');
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
    match lines.next() {
        Some((_, h)) if h.trim() == "file,label" => {}
        other => {
            return Err(bad(
                other.map_or(1, |(i, _)| i + 1),
                "the first line must be the header file,label".into(),
            ))
        }
    }
    let mut out = Vec::new();
    for (i, line) in lines {
        let Some((file, label)) = line.trim().rsplit_once(',') else {
            return Err(bad(i + 1, format!("{line:?} is not file,label")));
        };
        out.push((i + 1, file.trim().to_string(), label.trim().to_string()));
    }
    match out.is_empty() {
        true => Err(bad(1, "no rows: list one file,label per image".into())),
        false => Ok(out),
    }
}

/// The sorted names of the subfolders of `dir` (hidden ones aside).
fn class_folders(dir: &Path) -> Result<Vec<String>, PhotoError> {
    if !dir.is_dir() {
        return Err(PhotoError::MissingFolder { path: dir.into() });
    }
    let mut names: Vec<String> = entries(dir)?
        .into_iter()
        .filter(|p| p.is_dir())
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    match names.is_empty() {
        true => Err(PhotoError::NoClasses { path: dir.into() }),
        false => Ok(names),
    }
}

/// The entries of `dir`, sorted by path.
fn entries(dir: &Path) -> Result<Vec<PathBuf>, PhotoError> {
    let read = |source| PhotoError::Read {
        path: dir.into(),
        source,
    };
    let mut v = std::fs::read_dir(dir)
        .map_err(read)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)?;
    v.sort();
    Ok(v)
}

/// Every image file below `dir` (depth first, sorted) into `files`, other files into `ignored`.
fn walk(dir: &Path, files: &mut Vec<PathBuf>, ignored: &mut Vec<PathBuf>) -> Result<(), PhotoError> {
    for p in entries(dir)? {
        let hidden = p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden {
            continue;
        } else if p.is_dir() {
            walk(&p, files, ignored)?;
        } else if p
            .extension()
            .is_some_and(|e| EXTENSIONS.contains(&e.to_string_lossy().to_lowercase().as_str()))
        {
            files.push(p);
        } else {
            ignored.push(p);
        }
    }
    Ok(())
}

/// The folder of split `name`: `train/`, `val/`, `test/` under data.folder, or an OOD set's path.
pub(super) fn split_dir(cfg: &Config, name: &str) -> Result<PathBuf, DataError> {
    let base = Path::new(&cfg.data.folder);
    Ok(match name {
        "train" | "val" | "test" => base.join(name),
        _ => {
            let ood = cfg.data.ood.iter().find(|o| format!("ood_{}", o.name) == name);
            let Some(o) = ood else {
                return Err(DataError::UnknownSplit {
                    name: name.into(),
                    known: cfg.split_names(),
                });
            };
            if o.rotate {
                return Err(PhotoError::RotateOod { name: o.name.clone() }.into());
            }
            base.join(&o.path)
        }
    })
}
