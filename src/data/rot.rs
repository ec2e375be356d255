//! MNIST-rot regenerated as DESIGN.md ("MNIST-rot") fixes it, the OOD sets, and their on-disk
//! cache.
//!
//! Protocol (Larochelle et al. 2007, regenerated): pool = MNIST train (60k) then test (10k);
//! `ChaCha8Rng::seed_from_u64(data.split_seed)` shuffles the pool indices, then draws one angle
//! θ ~ U[0, 2π) per selected image in split order (train, val, test); the first `train_size`
//! go to train, the next `val_size` to val, the next `test_size` to test. Each image is rotated
//! about its centre with `transforms::apply(.., Rotate, θ, Zeros)`: bilinear, zero fill.
//! OOD sets draw their angles from the same seed on their own ChaCha stream (derived from the
//! set's name), so adding one never changes another.
//!
//! Cache: `<data.cache_dir>/<kind>-<key>/<split>.split`, where the key hashes the parameters
//! and the SHA-256 of the source files; a changed seed, size or source file gives a new key
//! (a rebuild), an unchanged one reads the file back. Files are written atomically.

use super::{amat, hub_mnist, idx, DataError, Digits, Images, Split};
use crate::config::{Config, DataSource, OodConfig};
use crate::progress::{self, Progress};
use crate::transforms::{apply, Padding, Transform};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Bumped whenever the generation procedure or the file layout changes (invalidates caches).
const FORMAT: &str = "liederiv-split-v1";
const MAGIC: &[u8; 8] = b"LDSPLIT1";
/// Images rotated per tensor call.
const CHUNK: usize = 1024;

/// Where the digits of the main splits come from.
enum Source {
    Idx(PathBuf),
    Hub,
    Amat(PathBuf),
}

/// `p` when absolute, else `<root>/p`; `None` when relative and there is no root.
fn under_root(cfg: &Config, p: &str) -> Option<PathBuf> {
    let p = Path::new(p);
    if p.is_absolute() {
        Some(p.to_path_buf())
    } else {
        cfg.data_root().map(|r| r.join(p))
    }
}

fn source(cfg: &Config) -> Result<Source, DataError> {
    let d = &cfg.data;
    let kind = match d.source {
        DataSource::Auto if !d.amat_dir.is_empty() => DataSource::Amat,
        DataSource::Auto if cfg.data_root().is_some() => DataSource::Idx,
        DataSource::Auto => DataSource::Hub,
        other => other,
    };
    let no_root = |key| DataError::NoRoot {
        source_kind: kind.name().into(),
        key,
    };
    Ok(match kind {
        DataSource::Amat => Source::Amat(under_root(cfg, &d.amat_dir).ok_or(no_root("amat_dir"))?),
        DataSource::Hub => Source::Hub,
        _ => Source::Idx(under_root(cfg, &d.mnist_dir).ok_or(no_root("mnist_dir"))?),
    })
}

/// SHA-256 over the files' bytes, in order.
fn hash_files(paths: &[PathBuf]) -> Result<String, DataError> {
    let mut h = Sha256::new();
    for p in paths {
        let bytes = std::fs::read(p).map_err(|source| DataError::Io {
            path: p.clone(),
            source,
        })?;
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    Ok(hex::encode(h.finalize()))
}

fn key(parts: &str) -> String {
    hex::encode(&Sha256::digest(format!("{FORMAT} {parts}"))[..8])
}

/// The files a main-split source reads, resolved (the Hub ones fetched or found in its cache).
fn source_files(cfg: &Config, src: &Source) -> Result<Vec<PathBuf>, DataError> {
    Ok(match src {
        Source::Idx(dir) => {
            let mut v = Vec::new();
            for prefix in ["train", "t10k"] {
                v.push(idx::find_file(dir, prefix, "images-idx3")?);
                v.push(idx::find_file(dir, prefix, "labels-idx1")?);
            }
            v
        }
        Source::Hub => hub_fetch(cfg, &cfg.data.hub_repo, &["train", "test"])?,
        Source::Amat(dir) => {
            let v = vec![dir.join(amat::TRAIN_VALID), dir.join(amat::TEST)];
            if let Some(p) = v.iter().find(|p| !p.is_file()) {
                return Err(DataError::MissingFile { path: p.clone() });
            }
            v
        }
    })
}

/// The Parquet files of `splits` of a Hub data set, from `data.hub_cache_dir` (downloaded into
/// it first unless `data.offline`).
fn hub_fetch(cfg: &Config, repo: &str, splits: &[&str]) -> Result<Vec<PathBuf>, DataError> {
    let d = &cfg.data;
    let cache = (!d.hub_cache_dir.is_empty()).then(|| Path::new(&d.hub_cache_dir));
    hub_mnist::fetch(repo, splits, cache, d.offline)
}

fn ood_config<'a>(cfg: &'a Config, name: &str) -> Option<&'a OodConfig> {
    let short = name.strip_prefix("ood_")?;
    cfg.data.ood.iter().find(|o| o.name == short)
}

/// Where an OOD set's test images come from.
enum OodSource {
    Idx(PathBuf),
    /// The fetched test Parquet file of the set's Hub repo.
    Hub(PathBuf),
}

impl OodSource {
    fn files(&self) -> Result<Vec<PathBuf>, DataError> {
        Ok(match self {
            OodSource::Idx(dir) => vec![
                idx::find_file(dir, "t10k", "images-idx3")?,
                idx::find_file(dir, "t10k", "labels-idx1")?,
            ],
            OodSource::Hub(file) => vec![file.clone()],
        })
    }

    fn read(&self) -> Result<Digits, DataError> {
        match self {
            OodSource::Idx(dir) => Ok(idx::read_pair(dir, "t10k")?.0),
            OodSource::Hub(file) => hub_mnist::read(file),
        }
    }
}

/// An OOD set's source: the first IDX folder that holds it (an absolute path, else
/// `<root>/<path>`, else `./<path>`; for Fashion-MNIST also Debian's
/// `/usr/share/datasets/fashion-mnist`), else its Hub repo's test split.
fn ood_source(cfg: &Config, o: &OodConfig) -> Result<OodSource, DataError> {
    let p = Path::new(&o.path);
    let mut tried = Vec::new();
    if p.is_absolute() {
        tried.push(p.to_path_buf());
    } else {
        tried.extend(cfg.data_root().map(|r| r.join(p)));
        tried.push(p.to_path_buf());
        if o.path == "fashion-mnist" {
            tried.push(PathBuf::from("/usr/share/datasets/fashion-mnist"));
        }
    }
    if let Some(dir) = tried.iter().find(|d| idx::find_file(d, "t10k", "images-idx3").is_ok()) {
        return Ok(OodSource::Idx(dir.clone()));
    }
    match o.hub_repo() {
        Some(repo) => Ok(OodSource::Hub(hub_fetch(cfg, repo, &["test"])?.remove(0))),
        None => Err(DataError::OodNotFound {
            name: o.name.clone(),
            tried,
        }),
    }
}

/// The cache directory of split `name`: its key hashes the parameters and the source files.
fn locate(cfg: &Config, name: &str) -> Result<PathBuf, DataError> {
    let d = &cfg.data;
    let root = Path::new(&d.cache_dir);
    if let Some(o) = ood_config(cfg, name) {
        let files = ood_source(cfg, o)?.files()?;
        let seed = if o.rotate { d.split_seed.to_string() } else { "-".into() };
        let k = key(&format!(
            "ood name={} rotate={} limit={} seed={seed} files={}",
            o.name,
            o.rotate,
            o.limit,
            hash_files(&files)?
        ));
        return Ok(root.join(format!("ood-{}-{k}", o.name)));
    }
    if !matches!(name, "train" | "val" | "test") {
        return Err(DataError::UnknownSplit {
            name: name.into(),
            known: cfg.split_names(),
        });
    }
    let src = source(cfg)?;
    let files = source_files(cfg, &src)?;
    let (kind, seed) = match src {
        Source::Idx(_) => ("idx", d.split_seed.to_string()),
        Source::Hub => ("hub", d.split_seed.to_string()),
        // The .amat digits are already rotated: no seed is involved.
        Source::Amat(_) => ("amat", "-".into()),
    };
    let k = key(&format!(
        "mnistrot source={kind} seed={seed} sizes={},{},{} files={}",
        d.train_size,
        d.val_size,
        d.test_size,
        hash_files(&files)?
    ));
    Ok(root.join(format!("mnistrot-{kind}-{k}")))
}

/// The cache file that holds split `name` under this config (it may not exist yet).
pub fn cache_path(cfg: &Config, name: &str) -> Result<PathBuf, DataError> {
    Ok(locate(cfg, name)?.join(format!("{name}.split")))
}

pub(super) fn load(cfg: &Config, name: &str) -> Result<Split, DataError> {
    let dir = locate(cfg, name)?;
    let path = dir.join(format!("{name}.split"));
    if let Some(s) = read_split(&path, name) {
        return Ok(s);
    }
    let built = match ood_config(cfg, name) {
        Some(o) => vec![build_ood(cfg, o)?],
        None => build_main(cfg)?,
    };
    std::fs::create_dir_all(&dir).map_err(|source| DataError::Io {
        path: dir.clone(),
        source,
    })?;
    let mut wanted = None;
    for s in built {
        write_split(&dir.join(format!("{}.split", s.name)), &s)?;
        if s.name == name {
            wanted = Some(s);
        }
    }
    wanted.ok_or_else(|| DataError::UnknownSplit {
        name: name.into(),
        known: cfg.split_names(),
    })
}

fn progress(cfg: &Config, n: usize, what: &str) -> Progress {
    Progress::new(
        progress::Mode::detect(cfg.output.progress),
        what,
        "images",
        n as u64,
        0,
        "{prefix} [{bar:30}] {pos}/{len} ({eta})",
    )
}

/// Rotate images (n·h·w floats) by `angles[i]` radians each, about the centre, bilinear with
/// zero fill — the MNIST-rot warp, `transforms::apply(.., Rotate, .., Padding::Zeros)`.
pub fn rotate_images(images: &[f32], h: usize, w: usize, angles: &[f64]) -> candle_core::Result<Vec<f32>> {
    rotate_with(images, h, w, angles, &Progress::hidden())
}

fn rotate_with(images: &[f32], h: usize, w: usize, angles: &[f64], bar: &Progress) -> candle_core::Result<Vec<f32>> {
    let hw = h * w;
    if images.len() != angles.len() * hw {
        candle_core::bail!(
            "rotate_images: {} floats for {} angles of {h}×{w} images",
            images.len(),
            angles.len()
        );
    }
    let chunks: Vec<Vec<f32>> = images
        .par_chunks(CHUNK * hw)
        .zip(angles.par_chunks(CHUNK))
        .map(|(imgs, ts)| {
            // (B·h·w) -> (B, 1, h, w)
            let x = Tensor::from_slice(imgs, (ts.len(), 1, h, w), &Device::Cpu)?;
            let y = apply(&x, Transform::Rotate, ts, Padding::Zeros)?;
            bar.inc(ts.len() as u64);
            // Bilinear weights can sum to 1 + 1 ulp in f32: keep pixels in [0, 1] exactly.
            y.clamp(0f32, 1f32)?.flatten_all()?.to_vec1::<f32>()
        })
        .collect::<candle_core::Result<_>>()?;
    Ok(chunks.concat())
}

fn angles(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.random::<f64>() * std::f64::consts::TAU).collect()
}

fn to_unit(pixels: &[u8]) -> Vec<f32> {
    pixels.iter().map(|&p| p as f32 / 255.0).collect()
}

fn split_of(name: &str, images: Vec<f32>, labels: Vec<u8>, h: usize, w: usize) -> Split {
    Split::digits(name, images, &labels, h, w)
}

/// Build train, val and test from the configured source.
fn build_main(cfg: &Config) -> Result<Vec<Split>, DataError> {
    let d = &cfg.data;
    let (tr, va, te) = (d.train_size, d.val_size, d.test_size);
    let pool = match source(cfg)? {
        Source::Amat(dir) => return build_amat(cfg, &dir),
        src => read_pool(cfg, &src)?,
    };
    let hw = pool.h * pool.w;
    let need = tr + va + te;
    if pool.labels.len() < need {
        return Err(DataError::TooFewImages {
            what: "the MNIST pool (train + test)".into(),
            have: pool.labels.len(),
            need,
        });
    }
    let (order, thetas) = draw(d.split_seed, pool.labels.len(), need);
    let mut pixels = Vec::with_capacity(need * hw);
    for &i in &order {
        pixels.extend_from_slice(&pool.images[i * hw..(i + 1) * hw]);
    }
    let labels: Vec<u8> = order.iter().map(|&i| pool.labels[i]).collect();
    let bar = progress(cfg, need, "rotating MNIST-rot");
    let rotated = rotate_with(&to_unit(&pixels), pool.h, pool.w, &thetas, &bar)?;
    bar.finish_and_clear();
    let cut = |a: usize, b: usize| (rotated[a * hw..b * hw].to_vec(), labels[a..b].to_vec());
    let mut out = Vec::new();
    for (name, a, b) in [("train", 0, tr), ("val", tr, tr + va), ("test", tr + va, need)] {
        let (imgs, labs) = cut(a, b);
        out.push(split_of(name, imgs, labs, pool.h, pool.w));
    }
    Ok(out)
}

/// The draw behind MNIST-rot: which of the `pool` digits fill the `need` split slots (train,
/// then val, then test), and the angle θ ~ U[0, 2π) (radians) each is rotated by.
fn draw(split_seed: u64, pool: usize, need: usize) -> (Vec<usize>, Vec<f64>) {
    let mut rng = ChaCha8Rng::seed_from_u64(split_seed);
    let mut order: Vec<usize> = (0..pool).collect();
    order.shuffle(&mut rng);
    order.truncate(need);
    let thetas = angles(&mut rng, need);
    (order, thetas)
}

/// The pool index and rotation angle (radians) of every image of train, val and test, in split
/// order, as the regenerated MNIST-rot draws them for this config from a pool of `pool` digits
/// (70,000 for MNIST), for checks from outside.
pub fn mnist_rot_draw(cfg: &Config, pool: usize) -> Vec<(usize, f64)> {
    let d = &cfg.data;
    let (order, thetas) = draw(d.split_seed, pool, d.train_size + d.val_size + d.test_size);
    order.into_iter().zip(thetas).collect()
}

/// The 70k MNIST digits, train then test, from an IDX or Hub source.
fn read_pool(cfg: &Config, src: &Source) -> Result<Digits, DataError> {
    match src {
        Source::Idx(dir) => {
            let (train, _) = idx::read_pair(dir, "train")?;
            let (test, _) = idx::read_pair(dir, "t10k")?;
            join_pool(train, test, &dir.display().to_string())
        }
        Source::Hub => {
            let files = source_files(cfg, src)?;
            join_pool(
                hub_mnist::read(&files[0])?,
                hub_mnist::read(&files[1])?,
                &cfg.data.hub_repo,
            )
        }
        Source::Amat(dir) => Err(DataError::Corrupt {
            path: dir.clone(),
            message: "the .amat files hold MNIST-rot, not the unrotated MNIST pool".into(),
        }),
    }
}

/// The unrotated MNIST pool (train then test, 70k digits) from the source this config resolves
/// to: the IDX folder under the data root, else the Hub (`.amat` holds no unrotated digits).
pub fn mnist_pool(cfg: &Config) -> Result<Digits, DataError> {
    read_pool(cfg, &source(cfg)?)
}

fn join_pool(mut a: Digits, b: Digits, what: &str) -> Result<Digits, DataError> {
    if (a.h, a.w) != (b.h, b.w) {
        return Err(DataError::SizeMismatch {
            what: what.into(),
            h1: a.h,
            w1: a.w,
            h2: b.h,
            w2: b.w,
        });
    }
    a.images.extend_from_slice(&b.images);
    a.labels.extend_from_slice(&b.labels);
    Ok(a)
}

/// The original files: train = first `train_size` rows of train_valid, val = the next
/// `val_size` (with the defaults, its last 2,000), test = the first `test_size` rows of test.
fn build_amat(cfg: &Config, dir: &Path) -> Result<Vec<Split>, DataError> {
    let d = &cfg.data;
    let side = 28;
    let hw = amat::PIXELS;
    let tv_path = dir.join(amat::TRAIN_VALID);
    let (tv_img, tv_lab) = amat::read(&tv_path)?;
    let (te_img, te_lab) = amat::read(&dir.join(amat::TEST))?;
    let (tr, va, te) = (d.train_size, d.val_size, d.test_size);
    if tv_lab.len() < tr + va {
        return Err(DataError::TooFewImages {
            what: tv_path.display().to_string(),
            have: tv_lab.len(),
            need: tr + va,
        });
    }
    if te_lab.len() < te {
        return Err(DataError::TooFewImages {
            what: dir.join(amat::TEST).display().to_string(),
            have: te_lab.len(),
            need: te,
        });
    }
    Ok(vec![
        split_of("train", tv_img[..tr * hw].to_vec(), tv_lab[..tr].to_vec(), side, side),
        split_of(
            "val",
            tv_img[tr * hw..(tr + va) * hw].to_vec(),
            tv_lab[tr..tr + va].to_vec(),
            side,
            side,
        ),
        split_of("test", te_img[..te * hw].to_vec(), te_lab[..te].to_vec(), side, side),
    ])
}

fn build_ood(cfg: &Config, o: &OodConfig) -> Result<Split, DataError> {
    let mut digits = ood_source(cfg, o)?.read()?;
    let hw = digits.h * digits.w;
    if o.limit > 0 && o.limit < digits.labels.len() {
        digits.labels.truncate(o.limit);
        digits.images.truncate(o.limit * hw);
    }
    let name = format!("ood_{}", o.name);
    let mut images = to_unit(&digits.images);
    if o.rotate {
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.data.split_seed);
        // Stream 0 is MNIST-rot's; each OOD set gets its own, derived from its name.
        let digest = Sha256::digest(name.as_bytes());
        let stream = u64::from_le_bytes([
            digest[0], digest[1], digest[2], digest[3], digest[4], digest[5], digest[6], digest[7],
        ]) | 1;
        rng.set_stream(stream);
        let thetas = angles(&mut rng, digits.labels.len());
        let bar = progress(cfg, thetas.len(), &format!("rotating {name}"));
        images = rotate_with(&images, digits.h, digits.w, &thetas, &bar)?;
        bar.finish_and_clear();
    }
    Ok(split_of(&name, images, digits.labels, digits.h, digits.w))
}

/// Layout: MAGIC, n, h, w (u64 LE), n·h·w f32 LE, n label bytes.
fn write_split(path: &Path, s: &Split) -> Result<(), DataError> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let Images::Grey { pixels, h, w } = &s.images else {
        unreachable!("MNIST-rot builds digit splits only")
    };
    let tmp = crate::runtime::temp_sibling(path, "");
    let mut buf = Vec::with_capacity(32 + pixels.len() * 4 + s.labels.len());
    buf.extend_from_slice(MAGIC);
    for v in [s.len(), *h, *w] {
        buf.extend_from_slice(&(v as u64).to_le_bytes());
    }
    for v in pixels {
        buf.extend_from_slice(&v.to_le_bytes());
    }
    // Digit labels (< 10): one byte each.
    buf.extend(s.labels.iter().map(|&l| l as u8));
    // No fsync: the rename makes the file appear whole or not at all, and a file damaged by a
    // crash fails the length check in `read_split` and is rebuilt.
    std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&buf))
        .map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// The cached split, or `None` when the file is absent or not a complete split file (then the
/// caller rebuilds it).
fn read_split(path: &Path, name: &str) -> Option<Split> {
    let bytes = std::fs::read(path).ok()?;
    if bytes.get(..8)? != MAGIC {
        return None;
    }
    let field = |k: usize| -> Option<usize> {
        let b: [u8; 8] = bytes.get(8 + 8 * k..16 + 8 * k)?.try_into().ok()?;
        usize::try_from(u64::from_le_bytes(b)).ok()
    };
    let (n, h, w) = (field(0)?, field(1)?, field(2)?);
    let npix = n.checked_mul(h)?.checked_mul(w)?;
    if bytes.len() != 32 + npix.checked_mul(4)? + n {
        return None;
    }
    let images = bytes[32..32 + npix * 4]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let labels = bytes[32 + npix * 4..].to_vec();
    Some(split_of(name, images, labels, h, w))
}
