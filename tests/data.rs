//! Data sources and the Hub client: IDX / `.amat` parsing and validation, MNIST-rot generation
//! and caching, the loader, and `hub::fetch` against a loopback mock Hub and a pre-populated
//! cache. Real-data tests find the data as the CLI does (`LIEDERIV_DATA_DIR`, else the Hub cache)
//! and fail (not skip) when neither has it.

use liederiv::hub::{self, HubError, HubSource, RepoKind};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A loopback stand-in for the Hub's `resolve` endpoint: answers HEAD with ETag, X-Repo-Commit
/// and Content-Length (and no X-Xet-Hash, so hf-hub takes the plain HTTP path) and GET with the
/// bytes. Files are matched by the end of the request path (`.../resolve/<rev>/<file>`).
struct MockHub {
    url: String,
    requests: Arc<AtomicUsize>,
}

const MOCK_COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

impl MockHub {
    fn start(files: HashMap<String, Vec<u8>>) -> MockHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(AtomicUsize::new(0));
        let count = requests.clone();
        let files = Arc::new(files);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let files = files.clone();
                count.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&buf).to_string();
                    let mut parts = head.split_whitespace();
                    let method = parts.next().unwrap_or("").to_string();
                    let path = parts.next().unwrap_or("").to_string();
                    let hit = files
                        .iter()
                        .find(|(name, _)| path.contains("/resolve/") && path.ends_with(&format!("/{name}")));
                    let resp = match hit {
                        Some((_, body)) => {
                            use sha2::Digest;
                            let etag = hex::encode(sha2::Sha256::digest(body));
                            let mut r = format!(
                                "HTTP/1.1 200 OK\r\nETag: \"{etag}\"\r\nX-Repo-Commit: {MOCK_COMMIT}\r\n\
                                 Content-Length: {}\r\nConnection: close\r\n\r\n",
                                body.len()
                            )
                            .into_bytes();
                            if method == "GET" {
                                r.extend_from_slice(body);
                            }
                            r
                        }
                        None => format!(
                            "HTTP/1.1 404 Not Found\r\nX-Repo-Commit: {MOCK_COMMIT}\r\nContent-Length: 0\r\n\
                             Connection: close\r\n\r\n"
                        )
                        .into_bytes(),
                    };
                    let _ = stream.write_all(&resp);
                });
            }
        });
        MockHub { url, requests }
    }
}

fn source<'a>(repo: &'a str, cache: &'a Path, offline: bool, endpoint: Option<&'a str>) -> HubSource<'a> {
    HubSource {
        repo,
        kind: RepoKind::Dataset,
        revision: "refs/convert/parquet",
        cache_dir: Some(cache),
        offline,
        endpoint,
    }
}

/// An endpoint where nothing listens: bind an ephemeral port, then free it.
fn dead_endpoint() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    url
}

#[test]
fn hub_fetch_from_mock_then_offline_from_cache() {
    let body = b"hello hub".to_vec();
    let mock = MockHub::start(HashMap::from([("mnist/train/0000.parquet".to_string(), body.clone())]));
    let cache = tempfile::tempdir().unwrap();
    let src = source("ylecun/mnist", cache.path(), false, Some(&mock.url));
    let path = hub::fetch(&src, "mnist/train/0000.parquet").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), body);
    assert!(path.starts_with(cache.path().join("datasets--ylecun--mnist")));
    let served = mock.requests.load(Ordering::SeqCst);
    assert!(served >= 2, "expected HEAD + GET, got {served} requests");

    // Offline: the same file resolves from the cache without a single request.
    let offline = source("ylecun/mnist", cache.path(), true, Some(&mock.url));
    let again = hub::fetch(&offline, "mnist/train/0000.parquet").unwrap();
    assert_eq!(std::fs::read(&again).unwrap(), body);
    assert_eq!(mock.requests.load(Ordering::SeqCst), served);

    // Online with the Hub gone: hf-hub falls back to the cached copy.
    let dead = dead_endpoint();
    let gone = source("ylecun/mnist", cache.path(), false, Some(&dead));
    assert_eq!(
        std::fs::read(hub::fetch(&gone, "mnist/train/0000.parquet").unwrap()).unwrap(),
        body
    );
}

#[test]
fn hub_offline_reads_prepopulated_cache() {
    // The layout `huggingface-cli download --cache-dir` writes: refs/<rev> holds the commit,
    // snapshots/<commit>/<file> is the file (a symlink into blobs/ there; a plain file works too).
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--someone--tiny-vit");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), MOCK_COMMIT).unwrap();
    let snap = repo.join("snapshots").join(MOCK_COMMIT);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::write(snap.join("model.safetensors"), b"weights").unwrap();
    let src = HubSource {
        repo: "someone/tiny-vit",
        kind: RepoKind::Model,
        revision: "main",
        cache_dir: Some(cache.path()),
        offline: true,
        endpoint: None,
    };
    let path = hub::fetch(&src, "model.safetensors").unwrap();
    assert_eq!(std::fs::read(path).unwrap(), b"weights");
}

#[test]
fn hub_not_cached_error_says_what_to_do() {
    let cache = tempfile::tempdir().unwrap();
    let dead = dead_endpoint();
    for (offline, endpoint) in [(true, None), (false, Some(dead.as_str()))] {
        let src = source("ylecun/mnist", cache.path(), offline, endpoint);
        let err = hub::fetch(&src, "mnist/test/0000.parquet").unwrap_err();
        assert!(matches!(err, HubError::NotCached { .. }), "{err:?}");
        let msg = err.to_string();
        for needle in [
            "ylecun/mnist",
            "mnist/test/0000.parquet",
            &cache.path().display().to_string(),
            "huggingface-cli download",
            "unreachable",
        ] {
            assert!(msg.contains(needle), "message lacks {needle:?}: {msg}");
        }
    }
}

#[test]
fn hub_missing_file_is_a_download_error() {
    let mock = MockHub::start(HashMap::new());
    let cache = tempfile::tempdir().unwrap();
    let src = source("ylecun/mnist", cache.path(), false, Some(&mock.url));
    let err = hub::fetch(&src, "nope.parquet").unwrap_err();
    assert!(matches!(err, HubError::Download { .. }), "{err:?}");
    assert!(err.to_string().contains("nope.parquet"));
}

// ---------------------------------------------------------------------------------------------
// Synthetic sources

use liederiv::config::{Config, PerChannel};
use liederiv::data::{self, amat, idx, DataError, Images, Split};
use rand::{Rng, SeedableRng};
use std::path::PathBuf;

fn maybe_gz(bytes: Vec<u8>, gz: bool) -> Vec<u8> {
    if !gz {
        return bytes;
    }
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(&bytes).unwrap();
    e.finish().unwrap()
}

fn idx_images(pixels: &[u8], n: usize, h: usize, w: usize) -> Vec<u8> {
    let mut v = Vec::new();
    for x in [2051u32, n as u32, h as u32, w as u32] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    v.extend_from_slice(pixels);
    v
}

fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    for x in [2049u32, labels.len() as u32] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    v.extend_from_slice(labels);
    v
}

/// Seeded random digits: n images of h×w (sparse blobs so rotations move mass) and labels.
fn random_digits(n: usize, h: usize, w: usize, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let pixels = (0..n * h * w)
        .map(|_| {
            if rng.random::<f32>() < 0.3 {
                rng.random::<u8>()
            } else {
                0
            }
        })
        .collect();
    let labels = (0..n).map(|_| rng.random_range(0..10u8)).collect();
    (pixels, labels)
}

/// Write `<dir>/<prefix>-{images-idx3,labels-idx1}-ubyte[.gz]`.
fn write_pair(dir: &Path, prefix: &str, pixels: &[u8], labels: &[u8], h: usize, w: usize, gz: bool) {
    std::fs::create_dir_all(dir).unwrap();
    let ext = if gz { ".gz" } else { "" };
    let n = labels.len();
    std::fs::write(
        dir.join(format!("{prefix}-images-idx3-ubyte{ext}")),
        maybe_gz(idx_images(pixels, n, h, w), gz),
    )
    .unwrap();
    std::fs::write(
        dir.join(format!("{prefix}-labels-idx1-ubyte{ext}")),
        maybe_gz(idx_labels(labels), gz),
    )
    .unwrap();
}

/// A data root with `mnist/` (60 train + 20 test digits, 28×28) and `fashion-mnist/` (15 test).
fn synthetic_root(dir: &Path) {
    let (p, l) = random_digits(60, 28, 28, 1);
    write_pair(&dir.join("mnist"), "train", &p, &l, 28, 28, true);
    let (p, l) = random_digits(20, 28, 28, 2);
    write_pair(&dir.join("mnist"), "t10k", &p, &l, 28, 28, false);
    let (p, l) = random_digits(15, 28, 28, 3);
    write_pair(&dir.join("fashion-mnist"), "t10k", &p, &l, 28, 28, true);
}

fn small_cfg(root: &Path, cache: &Path, extra: &[&str]) -> Config {
    let mut sets: Vec<String> = vec![
        format!("data.root={:?}", root.display().to_string()),
        format!("data.cache_dir={:?}", cache.display().to_string()),
        "data.train_size=30".into(),
        "data.val_size=10".into(),
        "data.test_size=25".into(),
        "output.progress=false".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    Config::resolve_str("", "<test>", &sets).unwrap()
}

// ---------------------------------------------------------------------------------------------
// IDX

#[test]
fn idx_round_trip_gz_and_raw() {
    for gz in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (p, l) = random_digits(7, 5, 4, 9);
        write_pair(dir.path(), "train", &p, &l, 5, 4, gz);
        let (d, paths) = idx::read_pair(dir.path(), "train").unwrap();
        assert_eq!((d.images, d.labels, d.h, d.w), (p, l, 5, 4));
        assert_eq!(paths[0].extension().is_some_and(|e| e == "gz"), gz);
    }
}

#[test]
fn idx_corruptions_give_the_intended_errors() {
    let (p, l) = random_digits(7, 5, 4, 9);
    let at = Path::new("x-ubyte");
    // Bad magic: a labels file handed over as images and vice versa.
    match idx::parse_images(&idx_labels(&l), at) {
        Err(DataError::BadMagic {
            expected: 2051,
            found: 2049,
            ..
        }) => {}
        r => panic!("{r:?}"),
    }
    match idx::parse_labels(&idx_images(&p, 7, 5, 4), at) {
        Err(DataError::BadMagic {
            expected: 2049,
            found: 2051,
            ..
        }) => {}
        r => panic!("{r:?}"),
    }
    // Short file: 10 bytes missing.
    let full = idx_images(&p, 7, 5, 4);
    let err = idx::parse_images(&full[..full.len() - 10], at).unwrap_err();
    match &err {
        DataError::Truncated { expected, actual, .. } => {
            assert_eq!((*expected, *actual), (16 + 140, 16 + 130))
        }
        e => panic!("{e:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("x-ubyte") && msg.contains("156") && msg.contains("146"),
        "{msg}"
    );
    // Label 11.
    let mut bad = l.clone();
    bad[3] = 11;
    match idx::parse_labels(&idx_labels(&bad), at) {
        Err(DataError::LabelRange {
            index: 3, label: 11, ..
        }) => {}
        r => panic!("{r:?}"),
    }
    // Count mismatch between the two files of a pair.
    let dir = tempfile::tempdir().unwrap();
    write_pair(dir.path(), "t10k", &p, &l[..6], 5, 4, false);
    std::fs::write(dir.path().join("t10k-images-idx3-ubyte"), idx_images(&p, 7, 5, 4)).unwrap();
    match idx::read_pair(dir.path(), "t10k") {
        Err(DataError::CountMismatch {
            images: 7, labels: 6, ..
        }) => {}
        r => panic!("{r:?}"),
    }
    // A truncated gzip download.
    let gz = maybe_gz(full.clone(), true);
    std::fs::write(dir.path().join("t10k-images-idx3-ubyte.gz"), &gz[..gz.len() / 2]).unwrap();
    match idx::read_pair(dir.path(), "t10k") {
        Err(DataError::Corrupt { path, .. }) => assert!(path.ends_with("t10k-images-idx3-ubyte.gz")),
        r => panic!("{r:?}"),
    }
    // A missing file names what it looked for.
    match idx::read_pair(dir.path(), "train") {
        Err(DataError::MissingFile { path }) => assert!(path.ends_with("train-images-idx3-ubyte[.gz]")),
        r => panic!("{r:?}"),
    }
}

#[test]
fn idx_never_panics_on_garbage() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let at = Path::new("garbage");
    for k in 0..2000 {
        let len = rng.random_range(0..64usize);
        let mut b: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        // Half the time keep a valid magic so the dimension checks run.
        if k % 2 == 0 && len >= 4 {
            b[..4].copy_from_slice(&(if k % 4 == 0 { 2051u32 } else { 2049 }).to_be_bytes());
        }
        let _ = idx::parse_images(&b, at);
        let _ = idx::parse_labels(&b, at);
    }
    // Huge announced dimensions must not allocate or overflow.
    let mut b = Vec::new();
    for x in [2051u32, u32::MAX, u32::MAX, u32::MAX] {
        b.extend_from_slice(&x.to_be_bytes());
    }
    assert!(matches!(idx::parse_images(&b, at), Err(DataError::Truncated { .. })));
}

// ---------------------------------------------------------------------------------------------
// .amat

fn amat_text(images: &[Vec<f32>], labels: &[u8]) -> String {
    let mut s = String::new();
    for (img, l) in images.iter().zip(labels) {
        for v in img {
            s.push_str(&format!("{v:.6} "));
        }
        s.push_str(&format!("{l}.000000\n"));
    }
    s
}

#[test]
fn amat_small_file_parses_and_feeds_the_splits() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let imgs: Vec<Vec<f32>> = (0..5)
        .map(|_| (0..784).map(|_| (rng.random_range(0..=1000) as f32) / 1000.0).collect())
        .collect();
    let labels = vec![3u8, 0, 9, 1, 7];
    let (x, y) = amat::parse(&amat_text(&imgs, &labels), Path::new("t.amat")).unwrap();
    assert_eq!(y, labels);
    assert_eq!(x, imgs.concat());

    // Errors name the line.
    let mut bad = amat_text(&imgs[..2], &labels[..2]);
    bad.push_str("0.5 0.5 1\n");
    match amat::parse(&bad, Path::new("t.amat")) {
        Err(DataError::Amat { line: 3, .. }) => {}
        r => panic!("{r:?}"),
    }
    let twelve = amat_text(&imgs[..1], &[12]);
    assert!(matches!(
        amat::parse(&twelve, Path::new("t.amat")),
        Err(DataError::Amat { line: 1, .. })
    ));

    // As the data source: train = first rows of train_valid, val = the next, test from test.
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(amat::TRAIN_VALID), amat_text(&imgs[..3], &labels[..3])).unwrap();
    std::fs::write(dir.path().join(amat::TEST), amat_text(&imgs[3..], &labels[3..])).unwrap();
    let cfg = small_cfg(
        dir.path(),
        cache.path(),
        &[
            "data.source=\"amat\"",
            &format!("data.amat_dir={:?}", dir.path().display().to_string()),
            "data.train_size=2",
            "data.val_size=1",
            "data.test_size=2",
        ],
    );
    let train = data::load_split(&cfg, "train").unwrap();
    let val = data::load_split(&cfg, "val").unwrap();
    let test = data::load_split(&cfg, "test").unwrap();
    assert_eq!(
        (&train.labels, &val.labels, &test.labels),
        (&vec![3, 0], &vec![9], &vec![1, 7])
    );
    assert_eq!(px(&train), imgs[..2].concat());
}

// ---------------------------------------------------------------------------------------------
// MNIST-rot

#[test]
fn rotation_path_quarter_turns_are_index_rotations() {
    let n = 28;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let x: Vec<f32> = (0..n * n).map(|_| rng.random()).collect();
    let pi = std::f64::consts::PI;
    let batch = [x.clone(), x.clone(), x.clone(), x.clone()].concat();
    let out = data::rotate_images(&batch, n, n, &[0.0, pi / 2.0, pi, 1.5 * pi]).unwrap();
    let at = |k: usize, i: usize, j: usize| out[k * n * n + i * n + j];
    let mut worst = 0f32;
    for i in 0..n {
        for j in 0..n {
            // A(θ) = [[cos, sin], [−sin, cos]] samples x at A·u: θ = π/2 reads x[W−1−j][i].
            let expect = [
                x[i * n + j],
                x[(n - 1 - j) * n + i],
                x[(n - 1 - i) * n + (n - 1 - j)],
                x[j * n + (n - 1 - i)],
            ];
            for (k, e) in expect.into_iter().enumerate() {
                worst = worst.max((at(k, i, j) - e).abs());
            }
        }
    }
    assert!(worst < 1e-6, "max deviation {worst}");
}

#[test]
fn mnist_rot_is_seeded_and_cached() {
    let root = tempfile::tempdir().unwrap();
    synthetic_root(root.path());
    let (c1, c2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg = small_cfg(root.path(), c1.path(), &[]);
    let load = |cfg: &Config| -> Vec<Split> {
        ["train", "val", "test"]
            .iter()
            .map(|s| data::load_split(cfg, s).unwrap())
            .collect()
    };
    let a = load(&cfg);
    assert_eq!(a.iter().map(Split::len).collect::<Vec<_>>(), vec![30, 10, 25]);
    for s in &a {
        assert!(px(s).iter().all(|v| (0.0..=1.0).contains(v)), "{}", s.name);
        assert_eq!(grey_size(s), (28, 28));
    }
    // Same seed, fresh cache: the same bytes.
    let b = load(&small_cfg(root.path(), c2.path(), &[]));
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.sha256().unwrap(), y.sha256().unwrap());
    }
    // Another seed: other bytes (another permutation and other angles).
    let other = small_cfg(root.path(), c2.path(), &["data.split_seed=1"]);
    let c = load(&other);
    for (x, y) in a.iter().zip(&c) {
        assert_ne!(x.sha256().unwrap(), y.sha256().unwrap());
    }
    // The 65 selected digits are distinct pool digits: rotation keeps the label multiset inside
    // the pool's, and the per-class counts of train+val+test never exceed the pool's.
    let pool: Vec<u8> = [random_digits(60, 28, 28, 1).1, random_digits(20, 28, 28, 2).1].concat();
    let mut pool_counts = [0usize; 10];
    pool.iter().for_each(|&l| pool_counts[l as usize] += 1);
    let mut got = [0usize; 10];
    for s in &a {
        for (k, c) in s.class_counts().into_iter().enumerate() {
            got[k] += c;
        }
    }
    assert!(
        got.iter().zip(&pool_counts).all(|(g, p)| g <= p),
        "{got:?} vs {pool_counts:?}"
    );

    // Cache reuse: the second load reads the file back without rewriting it.
    let path = data::cache_path(&cfg, "test").unwrap();
    let before = std::fs::metadata(&path).unwrap().modified().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let again = data::load_split(&cfg, "test").unwrap();
    assert_eq!(again.sha256().unwrap(), a[2].sha256().unwrap());
    assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), before);
    // A changed seed is a different cache entry, built on first use.
    let seeded = small_cfg(root.path(), c1.path(), &["data.split_seed=7"]);
    let p7 = data::cache_path(&seeded, "test").unwrap();
    assert_ne!(p7, path);
    assert!(!p7.exists());
    data::load_split(&seeded, "test").unwrap();
    assert!(p7.exists());
    // A changed source file is too (content hash), and a damaged cache file is rebuilt.
    let (p, mut l) = random_digits(20, 28, 28, 2);
    l[0] = (l[0] + 1) % 10;
    write_pair(&root.path().join("mnist"), "t10k", &p, &l, 28, 28, false);
    assert_ne!(data::cache_path(&cfg, "test").unwrap(), path);
    let (p, l) = random_digits(20, 28, 28, 2);
    write_pair(&root.path().join("mnist"), "t10k", &p, &l, 28, 28, false);
    assert_eq!(data::cache_path(&cfg, "test").unwrap(), path);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert_eq!(
        data::load_split(&cfg, "test").unwrap().sha256().unwrap(),
        a[2].sha256().unwrap()
    );
}

#[test]
fn ood_sets_training_set_and_unknown_splits() {
    let root = tempfile::tempdir().unwrap();
    synthetic_root(root.path());
    let cache = tempfile::tempdir().unwrap();
    let cfg = small_cfg(root.path(), cache.path(), &[]);
    let ood = data::load_split(&cfg, "ood_fashion").unwrap();
    assert_eq!((ood.name.as_str(), ood.len()), ("ood_fashion", 15));
    // Unrotated with a limit: exactly the first IDX digits scaled to [0, 1].
    let (p, l) = random_digits(15, 28, 28, 3);
    let plain_cfg = small_cfg(
        root.path(),
        cache.path(),
        &["data.ood=[{name=\"fashion\", path=\"fashion-mnist\", rotate=false, limit=4}]"],
    );
    let plain = data::load_split(&plain_cfg, "ood_fashion").unwrap();
    assert_eq!(plain.labels, l[..4].iter().map(|&v| v as u32).collect::<Vec<_>>());
    let expect: Vec<f32> = p[..4 * 784].iter().map(|&v| v as f32 / 255.0).collect();
    assert_eq!(px(&plain), expect);
    assert_ne!(px(&ood)[..4 * 784], expect[..]);
    // An OOD entry pointing nowhere names the folders it tried.
    let lost = small_cfg(
        root.path(),
        cache.path(),
        &[
            "data.ood=[{name=\"mine\", path=\"/nonexistent/idx\"}]",
            "lee.splits=[\"test\"]",
        ],
    );
    match data::load_split(&lost, "ood_mine") {
        Err(DataError::OodNotFound { name, tried }) => {
            assert_eq!(
                (name.as_str(), tried),
                ("mine", vec![PathBuf::from("/nonexistent/idx")])
            )
        }
        r => panic!("{r:?}"),
    }
    assert!(matches!(
        data::load_split(&cfg, "ood_nope"),
        Err(DataError::UnknownSplit { .. })
    ));
    assert!(matches!(
        data::load_split(&cfg, "holdout"),
        Err(DataError::UnknownSplit { .. })
    ));

    // train + val, then a limit.
    let train = data::load_split(&cfg, "train").unwrap();
    let val = data::load_split(&cfg, "val").unwrap();
    let both = data::training_set(&cfg).unwrap();
    assert_eq!(both.len(), 40);
    assert_eq!(px(&both), [px(&train), px(&val)].concat());
    let only = data::training_set(&small_cfg(root.path(), cache.path(), &["data.train_on_val=false"])).unwrap();
    assert_eq!(only, train);
    let few = data::training_set(&small_cfg(root.path(), cache.path(), &["data.train_limit=5"])).unwrap();
    assert_eq!((few.len(), px(&few).len()), (5, 5 * 784));
    assert_eq!(px(&few)[..], px(&train)[..5 * 784]);

    // MAE pretraining's images: the fine-tuning set by default, else the named splits whatever
    // fine-tuning uses (a validation sweep's pretraining on train is a final run's too).
    assert_eq!(data::pretraining_set(&cfg).unwrap(), both);
    let pre = |sets: &[&str]| data::pretraining_set(&small_cfg(root.path(), cache.path(), sets)).unwrap();
    assert_eq!(pre(&["pretrain.images=\"train\""]), train);
    let sweep = ["pretrain.images=\"train_val\"", "data.train_on_val=false"];
    assert_eq!(pre(&sweep), both);
    assert_eq!(
        pre(&["pretrain.images=\"fine_tune\"", "data.train_on_val=false"]),
        train
    );
}

#[test]
fn missing_local_data_is_a_clear_error() {
    let root = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let cfg = small_cfg(root.path(), cache.path(), &[]);
    let err = data::load_split(&cfg, "train").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DataError::MissingFile { .. }), "{msg}");
    assert!(
        msg.contains("train-images-idx3-ubyte") && msg.contains("LIEDERIV_DATA_DIR"),
        "{msg}"
    );
}

// ---------------------------------------------------------------------------------------------
// Loader

#[test]
fn epoch_order_is_a_seeded_permutation() {
    let a = data::epoch_order(100, 3, 0);
    let mut sorted = a.clone();
    sorted.sort();
    assert_eq!(sorted, (0..100).collect::<Vec<_>>());
    assert_eq!(a, data::epoch_order(100, 3, 0));
    assert_ne!(a, data::epoch_order(100, 3, 1));
    assert_ne!(a, data::epoch_order(100, 4, 0));
}

/// The pixels of a digit split.
fn px(s: &Split) -> &[f32] {
    match &s.images {
        Images::Grey { pixels, .. } => pixels,
        Images::Photos(_) => panic!("{} is not a digit split", s.name),
    }
}

fn grey_size(s: &Split) -> (usize, usize) {
    match &s.images {
        Images::Grey { h, w, .. } => (*h, *w),
        Images::Photos(_) => panic!("{} is not a digit split", s.name),
    }
}

fn split_from(images: Vec<f32>, h: usize, w: usize) -> Split {
    let n = images.len() / (h * w);
    let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    Split::digits("t", images, &labels, h, w)
}

#[test]
fn batch_normalizes_replicates_and_resizes() {
    use candle_core::{Device, IndexOp};
    let dev = Device::Cpu;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let imgs: Vec<f32> = (0..3 * 784).map(|_| rng.random()).collect();
    let s = split_from(imgs.clone(), 28, 28);
    let mut d = liederiv::config::DataConfig::default();
    let (x, y) = data::batch(&s, &[2, 0], &d, &dev).unwrap();
    assert_eq!(x.dims(), &[2, 1, 28, 28]);
    assert_eq!(y.to_vec1::<u32>().unwrap(), vec![2, 0]);
    let got = x.i((0, 0)).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (g, v) in got.iter().zip(&imgs[2 * 784..]) {
        let e = ((*v as f64 - d.mean.get(0)) / d.std.get(0)) as f32;
        assert!((g - e).abs() < 1e-6, "{g} vs {e}");
    }
    d.channels = 3;
    let (x3, _) = data::batch(&s, &[1], &d, &dev).unwrap();
    assert_eq!(x3.dims(), &[1, 3, 28, 28]);
    let c0 = x3.i((0, 0)).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let c2 = x3.i((0, 2)).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(c0, c2);
    assert!(data::batch(&s, &[3], &d, &dev).is_err());

    // Resize 28 -> 64: a linear ramp stays the same ramp (Keys' cubic reproduces linear
    // functions) wherever no tap is clamped, and a constant stays constant everywhere.
    d.channels = 1;
    d.image_size = 64;
    d.mean = PerChannel(vec![0.0]);
    d.std = PerChannel(vec![1.0]);
    let ramp: Vec<f32> = (0..784)
        .map(|k| (k / 28) as f32 * 0.01 + (k % 28) as f32 * 0.02)
        .collect();
    let flat = vec![0.4f32; 784];
    let s = split_from([ramp, flat].concat(), 28, 28);
    let (x, _) = data::batch(&s, &[0, 1], &d, &dev).unwrap();
    assert_eq!(x.dims(), &[2, 1, 64, 64]);
    let r = x.i((0, 0)).unwrap().to_vec2::<f32>().unwrap();
    let scale = 28.0 / 64.0;
    let src = |i: usize| (i as f64 + 0.5) * scale - 0.5;
    let mut checked = 0;
    for (i, row) in r.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            let (si, sj) = (src(i), src(j));
            if (1.0..=25.0).contains(&si) && (1.0..=25.0).contains(&sj) {
                let e = si * 0.01 + sj * 0.02;
                assert!((*v as f64 - e).abs() < 1e-5, "({i},{j}) {v} vs {e}");
                checked += 1;
            }
        }
    }
    assert!(checked > 2500, "{checked}");
    let f = x.i((1, 0)).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(f.iter().all(|v| (v - 0.4).abs() < 1e-6));
}

// ---------------------------------------------------------------------------------------------
// Hub MNIST (Parquet + PNG), from a pre-populated Hub cache

fn png_bytes(pixels: &[u8], h: usize, w: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut e = png::Encoder::new(&mut out, w as u32, h as u32);
    e.set_color(png::ColorType::Grayscale);
    e.set_depth(png::BitDepth::Eight);
    e.write_header().unwrap().write_image_data(pixels).unwrap();
    out
}

/// The `datasets` Image-feature layout: `{image: {bytes, path}, label: int64}`, snappy.
fn write_parquet(path: &Path, pixels: &[u8], labels: &[u8]) {
    let pngs = pixels.chunks(784).map(|c| png_bytes(c, 28, 28)).collect();
    let labels: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
    write_image_parquet(path, pngs, &labels, ("image", "label"), None);
}

/// As `datasets` writes an image-classification set: column `columns.0` an Image feature
/// `{bytes, path}` holding `images` (encoded), `columns.1` an int64 label; `metadata` the
/// `huggingface` key-value entry (the features, with ClassLabel names).
fn write_image_parquet(
    path: &Path,
    images: Vec<Vec<u8>>,
    labels: &[i64],
    columns: (&str, &str),
    metadata: Option<String>,
) {
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::metadata::KeyValue;
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let schema = parquet::schema::parser::parse_message_type(&format!(
        "message schema {{ optional group {} {{ optional binary bytes; optional binary path (STRING); }} \
         optional int64 {}; }}",
        columns.0, columns.1
    ))
    .unwrap();
    let props = WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .set_key_value_metadata(metadata.map(|m| vec![KeyValue::new("huggingface".into(), m)]))
        .build();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = SerializedFileWriter::new(file, Arc::new(schema), Arc::new(props)).unwrap();
    let n = labels.len();
    let mut rg = writer.next_row_group().unwrap();
    let pngs: Vec<ByteArray> = images.into_iter().map(ByteArray::from).collect();
    let mut col = rg.next_column().unwrap().unwrap();
    col.typed::<ByteArrayType>()
        .write_batch(&pngs, Some(&vec![2; n]), None)
        .unwrap();
    col.close().unwrap();
    // image.path: null in every row (definition level 1: the group is there, the value is not).
    let mut col = rg.next_column().unwrap().unwrap();
    col.typed::<ByteArrayType>()
        .write_batch(&[], Some(&vec![1; n]), None)
        .unwrap();
    col.close().unwrap();
    let mut col = rg.next_column().unwrap().unwrap();
    col.typed::<Int64Type>()
        .write_batch(labels, Some(&vec![1; n]), None)
        .unwrap();
    col.close().unwrap();
    rg.close().unwrap();
    writer.close().unwrap();
}

#[test]
fn hub_parquet_source_matches_the_idx_source() {
    // The same 60 + 20 digits as IDX files and as a Hub cache of ylecun/mnist's Parquet branch.
    let root = tempfile::tempdir().unwrap();
    synthetic_root(root.path());
    let hub_cache = tempfile::tempdir().unwrap();
    let repo = hub_cache.path().join("datasets--ylecun--mnist");
    std::fs::create_dir_all(repo.join("refs/refs/convert")).unwrap();
    std::fs::write(repo.join("refs/refs/convert/parquet"), MOCK_COMMIT).unwrap();
    let snap = repo.join("snapshots").join(MOCK_COMMIT);
    let (p, l) = random_digits(60, 28, 28, 1);
    write_parquet(&snap.join("mnist/train/0000.parquet"), &p, &l);
    let (p2, l2) = random_digits(20, 28, 28, 2);
    write_parquet(&snap.join("mnist/test/0000.parquet"), &p2, &l2);
    let digits = data::hub_mnist::read(&snap.join("mnist/test/0000.parquet")).unwrap();
    assert_eq!((digits.images, digits.labels, digits.h, digits.w), (p2, l2, 28, 28));

    let cache = tempfile::tempdir().unwrap();
    let hub_cfg = |cache_dir: &Path| {
        small_cfg(
            root.path(),
            cache.path(),
            &[
                "data.source=\"hub\"",
                &format!("data.hub_cache_dir={:?}", cache_dir.display().to_string()),
                "data.offline=true",
            ],
        )
    };
    let idx_cfg = small_cfg(root.path(), cache.path(), &["data.source=\"idx\""]);
    for name in ["train", "val", "test"] {
        let a = data::load_split(&hub_cfg(hub_cache.path()), name).unwrap();
        let b = data::load_split(&idx_cfg, name).unwrap();
        assert_eq!(a.sha256().unwrap(), b.sha256().unwrap(), "{name}");
    }
    // Offline with an empty Hub cache: the Hub error, naming the repo and what to do.
    let empty = tempfile::tempdir().unwrap();
    let err = data::load_split(&hub_cfg(empty.path()), "train").unwrap_err();
    assert!(matches!(err, DataError::Hub(HubError::NotCached { .. })), "{err}");
    assert!(err.to_string().contains("ylecun/mnist"));
}

#[test]
fn a_corrupt_file_in_the_hub_cache_says_how_to_recover() {
    // The Hub cache layout: snapshots/<commit>/<file> is a symlink into blobs/. A file cut short
    // there names itself, its blob and the recovery; the same bytes outside a cache name only
    // the file.
    let hub_cache = tempfile::tempdir().unwrap();
    let repo = hub_cache.path().join("datasets--ylecun--mnist");
    let snap = repo.join("snapshots").join(MOCK_COMMIT).join("mnist/test");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    let (p, l) = random_digits(20, 28, 28, 3);
    let whole = tempfile::tempdir().unwrap();
    write_parquet(&whole.path().join("0000.parquet"), &p, &l);
    let bytes = std::fs::read(whole.path().join("0000.parquet")).unwrap();
    let blob = repo.join("blobs").join("0123abcd");
    std::fs::write(&blob, &bytes[..bytes.len() / 2]).unwrap();
    let link = snap.join("0000.parquet");
    std::os::unix::fs::symlink("../../../../blobs/0123abcd", &link).unwrap();
    let err = data::hub_mnist::read(&link).unwrap_err().to_string();
    assert!(
        err.contains(&link.display().to_string()) && err.contains("is corrupt"),
        "{err}"
    );
    assert!(
        err.contains("cached Hub download of datasets--ylecun--mnist: delete it"),
        "{err}"
    );
    assert!(
        err.contains("blobs/0123abcd") && err.contains("the next run downloads it again"),
        "{err}"
    );

    let plain = whole.path().join("cut.parquet");
    std::fs::write(&plain, &bytes[..bytes.len() / 2]).unwrap();
    let err = data::hub_mnist::read(&plain).unwrap_err().to_string();
    assert!(err.contains("is corrupt") && !err.contains("Hub"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Real data

#[test]
fn real_mnist_rot_splits() {
    // The data as the CLI finds it: $LIEDERIV_DATA_DIR, else the Hub cache.
    let cache = tempfile::tempdir().unwrap();
    let cfg = Config::resolve_str(
        "",
        "<test>",
        &[
            format!("data.cache_dir={:?}", cache.path().display().to_string()),
            "output.progress=false".into(),
        ],
    )
    .unwrap();
    let t0 = std::time::Instant::now();
    let train = data::load_split(&cfg, "train").unwrap();
    let built = t0.elapsed();
    let val = data::load_split(&cfg, "val").unwrap();
    let test = data::load_split(&cfg, "test").unwrap();
    let ood = data::load_split(&cfg, "ood_fashion").unwrap();
    eprintln!(
        "MNIST-rot build (70k pool read + 62k rotations + write): {:.2} s; all four splits: {:.2} s",
        built.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(
        (train.len(), val.len(), test.len(), ood.len()),
        (10_000, 2_000, 50_000, 10_000)
    );
    let counts: Vec<usize> = train
        .class_counts()
        .iter()
        .zip(val.class_counts())
        .map(|(a, b)| a + b)
        .collect();
    assert_eq!(counts.iter().sum::<usize>(), 12_000);
    // Every class is present in roughly its MNIST share (each is 9–11% of MNIST).
    assert!(counts.iter().all(|&c| (900..=1500).contains(&c)), "{counts:?}");
    for s in [&train, &val, &test, &ood] {
        assert_eq!(px(s).len(), s.len() * 784);
        assert!(px(s).iter().all(|v| (0.0..=1.0).contains(v)), "{}", s.name);
    }
    // Pinned: the regenerated benchmark is the same on every machine and every version. Change
    // these only with a deliberate change of the protocol (DESIGN.md, "MNIST-rot": pool order,
    // seeded permutation, angles, bilinear zero-fill warp) and bump the cache FORMAT with it.
    for (s, want) in [
        (
            &train,
            "7aef57064b8bfa75817896f13346d01b9fcce40c604f4f072470e343e02b0cb6",
        ),
        (&val, "b239a04b803463d7e357ec980b72baa59b81262043655d8e19a45e0615892e1a"),
        (
            &test,
            "7e61b97ae7a8c9b60088b59c98c4e96e90b1ca5975b559c81a6a51db7c657f32",
        ),
        (&ood, "72b45ee535fe1577ae911d004adf7950886db9416c751e336b220c53f58b5591"),
    ] {
        assert_eq!(s.sha256().unwrap(), want, "{} changed", s.name);
    }
    // And what the loader makes of them (the loader now serves photos too; the digits' tensors
    // must not move): the first 64 test digits at 28 px, normalised, and their labels, as f32 /
    // u32 little-endian bytes. The same hash at commit 1dc96f8, before the photo sources.
    let idx: Vec<usize> = (0..64).collect();
    let (x, y) = data::batch(&test, &idx, &cfg.data, &candle_core::Device::Cpu).unwrap();
    let mut h = <sha2::Sha256 as sha2::Digest>::new();
    for v in x.flatten_all().unwrap().to_vec1::<f32>().unwrap() {
        sha2::Digest::update(&mut h, v.to_le_bytes());
    }
    for l in y.to_vec1::<u32>().unwrap() {
        sha2::Digest::update(&mut h, l.to_le_bytes());
    }
    assert_eq!(
        hex::encode(sha2::Digest::finalize(h)),
        "6b22f0cf05763a17d58ed0e05fc770782b8ef5389f28dfdd52492ebde1635fe0",
        "the digits' batches changed"
    );
    // The angles are U[0, 2π) radians: Kolmogorov–Smirnov distance to the uniform CDF below the
    // 99% critical value 1.63/√n (n = 62,000: 0.0065). Angles in [0, π) would give D = 0.5,
    // degrees read as radians D ≈ 1.
    let draw = data::mnist_rot_draw(&cfg, 70_000);
    let mut thetas: Vec<f64> = draw.iter().map(|d| d.1).collect();
    thetas.sort_by(f64::total_cmp);
    let n = thetas.len() as f64;
    let ks = thetas
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let f = t / std::f64::consts::TAU;
            (f - i as f64 / n).abs().max(((i + 1) as f64 / n - f).abs())
        })
        .fold(0.0f64, f64::max);
    eprintln!("MNIST-rot angles: KS distance to U[0, 2π) {ks:.5} over {n} draws");
    assert!(ks < 1.63 / n.sqrt(), "KS distance {ks}");
    assert!(thetas[0] >= 0.0 && thetas[thetas.len() - 1] < std::f64::consts::TAU);
    // Each image is its pool digit rotated by its own angle: rotating it back by −θ recovers the
    // digit (correlation > 0.9 away from the corners the rotation cut off), while the digit
    // rotated by +θ again, or left alone, does not match as well. The pool as the CLI reads it.
    let pool = data::mnist_pool(&cfg).unwrap();
    for (k, &(idx, theta)) in draw.iter().take(16).enumerate() {
        let digit: Vec<f32> = pool.images[idx * 784..(idx + 1) * 784]
            .iter()
            .map(|&p| p as f32 / 255.0)
            .collect();
        let img = &px(&train)[k * 784..(k + 1) * 784];
        assert_eq!(
            train.labels[k], pool.labels[idx] as u32,
            "image {k}: label of another digit"
        );
        let back = data::rotate_images(img, 28, 28, &[-theta]).unwrap();
        let again = data::rotate_images(img, 28, 28, &[theta]).unwrap();
        let corr = |a: &[f32], b: &[f32]| {
            let (ma, mb) = (a.iter().sum::<f32>() / 784.0, b.iter().sum::<f32>() / 784.0);
            let (mut ab, mut aa, mut bb) = (0.0f32, 0.0f32, 0.0f32);
            for (x, y) in a.iter().zip(b) {
                ab += (x - ma) * (y - mb);
                aa += (x - ma) * (x - ma);
                bb += (y - mb) * (y - mb);
            }
            ab / (aa * bb).sqrt()
        };
        let (c_back, c_again) = (corr(&back, &digit), corr(&again, &digit));
        assert!(
            c_back > 0.9,
            "image {k} (θ = {theta:.3}): un-rotated correlation {c_back}"
        );
        // Near 0 or 2π the two directions coincide; elsewhere the wrong one is clearly worse.
        let off = theta.min(std::f64::consts::TAU - theta);
        if off > 0.5 {
            assert!(
                c_back > c_again + 0.1,
                "image {k} (θ = {theta:.3}): {c_back} vs {c_again}"
            );
        }
    }
    // Zero fill: a rotated corner samples outside the frame or next to MNIST's (nearly always)
    // empty border, so almost every corner pixel is exactly 0.
    for s in [&train, &val, &test] {
        let dark = (0..s.len()).filter(|&k| px(s)[k * 784] == 0.0).count();
        assert!(
            dark * 100 >= s.len() * 99,
            "{}: {dark} of {} corners are 0",
            s.name,
            s.len()
        );
    }
}

#[test]
fn data_info_json_from_the_cli() {
    let root = tempfile::tempdir().unwrap();
    synthetic_root(root.path());
    let cache = tempfile::tempdir().unwrap();
    let sets = [
        format!("data.root={:?}", root.path().display().to_string()),
        format!("data.cache_dir={:?}", cache.path().display().to_string()),
        "data.train_size=30".into(),
        "data.val_size=10".into(),
        "data.test_size=25".into(),
    ];
    let run = || {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_liederiv"));
        cmd.args(["data", "info", "--json"]);
        for s in &sets {
            cmd.args(["--set", s]);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let first = run();
    assert_eq!(first, run(), "a second run must print the same hashes");
    let v: serde_json::Value = serde_json::from_str(&first).unwrap();
    let splits = v["splits"].as_object().unwrap();
    let cfg = small_cfg(root.path(), cache.path(), &[]);
    for (name, n) in [("train", 30), ("val", 10), ("test", 25), ("ood_fashion", 15)] {
        let s = data::load_split(&cfg, name).unwrap();
        assert_eq!(splits[name]["n"], n);
        assert_eq!(splits[name]["sha256"], s.sha256().unwrap());
        assert_eq!(splits[name]["class_counts"], serde_json::json!(s.class_counts()));
    }
    // The documented order: train, val, test, then the OOD sets.
    let order: Vec<usize> = ["\"train\"", "\"val\"", "\"test\"", "\"ood_fashion\""]
        .iter()
        .map(|k| first.find(k).unwrap())
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{first}");
}

/// `liederiv data info --json` with `--set` overrides and extra environment; (stdout, stderr, ok).
fn data_info(sets: &[String], env: &[(&str, &str)]) -> (String, String, bool) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_liederiv"));
    cmd.args(["data", "info", "--json"]).env_remove("LIEDERIV_DATA_DIR");
    for s in sets {
        cmd.args(["--set", s]);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    )
}

#[test]
fn a_machine_without_local_data_gets_both_sets_from_the_hub() {
    // A mock Hub serving ylecun/mnist and zalando-datasets/fashion_mnist as the dataset viewer's
    // Parquet files, made from the local IDX files: the CLI, with no data folder, must build
    // the very same splits (hashes) as from the IDX folder.
    let root = Config::default()
        .data_root()
        .expect("this test makes its Hub files from the local IDX files: set LIEDERIV_DATA_DIR");
    let (train, _) = idx::read_pair(&root.join("mnist"), "train").unwrap();
    let (test, _) = idx::read_pair(&root.join("mnist"), "t10k").unwrap();
    let (fashion, _) = idx::read_pair(&root.join("fashion-mnist"), "t10k").unwrap();
    let files = tempfile::tempdir().unwrap();
    let mut served = HashMap::new();
    for (name, d) in [
        ("mnist/train/0000.parquet", &train),
        ("mnist/test/0000.parquet", &test),
        ("fashion_mnist/test/0000.parquet", &fashion),
    ] {
        let path = files.path().join(name);
        write_parquet(&path, &d.images, &d.labels);
        served.insert(name.to_string(), std::fs::read(&path).unwrap());
    }
    let mock = MockHub::start(served);

    let hub_cache = tempfile::tempdir().unwrap();
    let split_cache = tempfile::tempdir().unwrap();
    let common = |extra: &[String]| {
        let mut v = vec![
            format!("data.cache_dir={:?}", split_cache.path().display().to_string()),
            format!("data.hub_cache_dir={:?}", hub_cache.path().display().to_string()),
            "data.train_size=300".to_string(),
            "data.val_size=100".to_string(),
            "data.test_size=500".to_string(),
        ];
        v.extend_from_slice(extra);
        v
    };
    // The default OOD entry falls back to zalando-datasets/fashion_mnist; its local folder is
    // renamed to one no machine has (Debian's package would otherwise be found first).
    assert_eq!(
        liederiv::config::OodConfig::default().hub_repo(),
        Some("zalando-datasets/fashion_mnist")
    );
    let hub_ood = "data.ood=[{name=\"fashion\", path=\"no-such-fashion-mnist\", hub_repo=\"zalando-datasets/fashion_mnist\", limit=400}]";
    let idx_ood = "data.ood=[{name=\"fashion\", path=\"fashion-mnist\", limit=400}]";
    let (hub, err, ok) = data_info(&common(&[hub_ood.to_string()]), &[("HF_ENDPOINT", &mock.url)]);
    assert!(ok, "{err}");
    assert!(
        mock.requests.load(Ordering::SeqCst) >= 6,
        "three files, HEAD + GET each"
    );
    for repo in ["datasets--ylecun--mnist", "datasets--zalando-datasets--fashion_mnist"] {
        assert!(hub_cache.path().join(repo).is_dir(), "{repo} not in the Hub cache");
    }
    let root_set = format!("data.root={:?}", root.display().to_string());
    let (local, err, ok) = data_info(&common(&[root_set, idx_ood.to_string()]), &[]);
    assert!(ok, "{err}");
    let splits = |text: &str| serde_json::from_str::<serde_json::Value>(text).unwrap()["splits"].clone();
    let (hub, local) = (splits(&hub), splits(&local));
    for name in ["train", "val", "test", "ood_fashion"] {
        assert!(hub[name]["sha256"].is_string(), "{name}: {hub}");
        assert_eq!(hub[name]["sha256"], local[name]["sha256"], "{name}: Hub and IDX differ");
    }
    assert_eq!(hub["ood_fashion"]["n"], 400);

    // Offline with the Hub gone: everything comes from the Hub cache, without a request.
    let requests = mock.requests.load(Ordering::SeqCst);
    let fresh_splits = tempfile::tempdir().unwrap();
    let offline = |hub_dir: &Path| {
        let mut v = common(&["data.offline=true".to_string(), hub_ood.to_string()]);
        v[0] = format!("data.cache_dir={:?}", fresh_splits.path().display().to_string());
        v[1] = format!("data.hub_cache_dir={:?}", hub_dir.display().to_string());
        v
    };
    let (again, err, ok) = data_info(&offline(hub_cache.path()), &[("HF_ENDPOINT", &mock.url)]);
    assert!(ok, "{err}");
    assert_eq!(splits(&again), hub);
    assert_eq!(mock.requests.load(Ordering::SeqCst), requests);
    // Offline with an empty cache: a one-paragraph error naming the repo and the way out.
    let empty = tempfile::tempdir().unwrap();
    let (_, err, ok) = data_info(&offline(empty.path()), &[("HF_ENDPOINT", &mock.url)]);
    assert!(!ok);
    assert!(
        err.contains("ylecun/mnist") && err.contains("huggingface-cli download") && !err.contains("panicked"),
        "{err}"
    );
    // With MNIST cached and Fashion-MNIST not, the error names the Fashion-MNIST repo.
    let partial = tempfile::tempdir().unwrap();
    let src = hub_cache.path().join("datasets--ylecun--mnist");
    let dst = partial.path().join("datasets--ylecun--mnist");
    std::process::Command::new("cp")
        .arg("-a")
        .arg(&src)
        .arg(&dst)
        .status()
        .unwrap();
    let (_, err, ok) = data_info(&offline(partial.path()), &[("HF_ENDPOINT", &mock.url)]);
    assert!(!ok);
    assert!(
        err.contains("zalando-datasets/fashion_mnist") && err.contains("fashion_mnist/test/0000.parquet"),
        "{err}"
    );
}

#[test]
fn mnist_rot_rotation_matches_torch_grid_sample() {
    // MNIST training digits rotated by recorded non-right angles with PyTorch's grid_sample
    // (bilinear, zero padding, align_corners=True; scripts/fixtures/make_rotation_fixture.py):
    // the rotation that builds MNIST-rot must give the same pixels. A wrong sign, centre,
    // corner alignment, fill or unit (degrees) moves them by far more than 1e-5.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mnist_rotated_grid_sample.json");
    let fx: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let cfg = Config::resolve_str(
        "",
        "<test>",
        &[format!("data.cache_dir={:?}", cache.path().display().to_string())],
    )
    .unwrap();
    let pool = data::mnist_pool(&cfg).unwrap();
    let indices = fx["mnist_train_indices"].as_array().unwrap();
    let angles = fx["angles_rad"].as_array().unwrap();
    let mut worst = 0.0f64;
    for (k, (idx, theta)) in indices.iter().zip(angles).enumerate() {
        let (idx, theta) = (idx.as_u64().unwrap() as usize, theta.as_f64().unwrap());
        let digit: Vec<f32> = pool.images[idx * 784..(idx + 1) * 784]
            .iter()
            .map(|&p| p as f32 / 255.0)
            .collect();
        let ours = data::rotate_images(&digit, 28, 28, &[theta]).unwrap();
        let want = fx["rotated"][k].as_array().unwrap();
        for (a, b) in ours.iter().zip(want) {
            worst = worst.max((*a as f64 - b.as_f64().unwrap()).abs());
        }
        // The control: the same digit rotated the other way is far from torch's.
        let other = data::rotate_images(&digit, 28, 28, &[-theta]).unwrap();
        let off = other
            .iter()
            .zip(want)
            .map(|(a, b)| (*a as f64 - b.as_f64().unwrap()).abs())
            .fold(0.0, f64::max);
        assert!(off > 0.1, "digit {idx}: rotating by −θ also matches ({off})");
    }
    eprintln!("MNIST-rot rotation vs grid_sample: largest pixel difference {worst:e}");
    assert!(worst < 1e-5, "largest pixel difference to grid_sample: {worst:e}");
}

#[test]
fn any_hub_parquet_image_set_trains_evaluates_and_measures_from_the_cli() {
    // The five sample photos (JPEG and PNG, colour and grey, of several sizes) as a Hub data set
    // in the `datasets` layout with ClassLabel names, served by a mock Hub: `train` downloads it
    // into the cache, then `eval` and `lee` run offline from that cache.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/photos");
    let photos = ["astronaut.png", "camera.png", "chelsea.jpg", "coffee.jpg", "rocket.jpg"];
    let bytes: Vec<Vec<u8>> = photos.iter().map(|f| std::fs::read(dir.join(f)).unwrap()).collect();
    let names = serde_json::json!(["astronaut", "camera", "cat", "coffee", "rocket"]);
    let meta = serde_json::json!({"info": {"features": {
        "image": {"_type": "Image"},
        "label": {"_type": "ClassLabel", "names": names},
    }}})
    .to_string();
    let files = tempfile::tempdir().unwrap();
    let (train, test) = (files.path().join("train.parquet"), files.path().join("test.parquet"));
    let twice: Vec<Vec<u8>> = bytes.iter().chain(&bytes).cloned().collect();
    write_image_parquet(
        &train,
        twice,
        &[0, 1, 2, 3, 4, 0, 1, 2, 3, 4],
        ("image", "label"),
        Some(meta.clone()),
    );
    write_image_parquet(&test, bytes.clone(), &[0, 1, 2, 3, 4], ("image", "label"), Some(meta));
    let hub = MockHub::start(HashMap::from([
        ("default/train/0000.parquet".to_string(), std::fs::read(&train).unwrap()),
        ("default/test/0000.parquet".to_string(), std::fs::read(&test).unwrap()),
    ]));
    let cache = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let sets = |offline: bool| -> Vec<String> {
        vec![
            "data.source=\"parquet\"".into(),
            "data.parquet.repo=\"someone/photos\"".into(),
            format!("data.hub_cache_dir={:?}", cache.path().display().to_string()),
            format!("data.offline={offline}"),
            "data.ood=[]".into(),
            "data.image_size=32".into(),
            "data.channels=3".into(),
            "data.mean=[0.485, 0.456, 0.406]".into(),
            "data.std=[0.229, 0.224, 0.225]".into(),
            "augment.random_resized_crop=true".into(),
            "model.num_classes=5".into(),
            "model.vit.patch_size=8".into(),
            "train.steps=4".into(),
            "train.batch_size=4".into(),
            "train.eval_every=4".into(),
            "eval.splits=[\"test\"]".into(),
            "lee.splits=[\"test\"]".into(),
            "lee.limit=4".into(),
            format!("output.dir={:?}", out.path().display().to_string()),
            "output.progress=false".into(),
        ]
    };
    let run = |args: &[&str], sets: &[String], env: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_liederiv"));
        cmd.args(args).env_remove("LIEDERIV_DATA_DIR");
        for s in sets {
            cmd.args(["--set", s]);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let o = cmd.output().unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert!(o.status.success(), "{args:?}\n{stdout}\n{stderr}");
        (stdout.into_owned(), stderr.into_owned())
    };
    let (_, stderr) = run(&["train"], &sets(false), &[("HF_ENDPOINT", &hub.url)]);
    assert!(
        stderr.contains("train: 10 images in 5 classes from 1 Parquet file(s) of someone/photos (default/train)"),
        "{stderr}"
    );
    assert!(hub.requests.load(Ordering::SeqCst) > 0);
    let classes = std::fs::read_to_string(out.path().join("run/classes.json")).unwrap();
    let classes: serde_json::Value = serde_json::from_str(&classes).unwrap();
    assert_eq!(classes["classes"], names);

    let offline = sets(true);
    let dead = dead_endpoint();
    let (stdout, _) = run(&["eval"], &offline, &[("HF_ENDPOINT", &dead)]);
    assert!(stdout.contains("| test  | 5 |"), "{stdout}");
    let (stdout, _) = run(&["lee"], &offline, &[("HF_ENDPOINT", &dead)]);
    let row = stdout.lines().find(|l| l.starts_with("test")).unwrap_or_default();
    assert_eq!(row.split_whitespace().nth(1), Some("4"), "{stdout}");

    // A column the files do not have: the file and the column named.
    let mut cfg = small_cfg(files.path(), cache.path(), &[]);
    cfg.data.source = liederiv::config::DataSource::Parquet;
    cfg.data.parquet.repo = "someone/photos".into();
    cfg.data.hub_cache_dir = cache.path().display().to_string();
    cfg.data.offline = true;
    cfg.data.parquet.label_column = "category".into();
    let err = data::load_split(&cfg, "test").unwrap_err().to_string();
    assert!(
        err.contains("0000.parquet") && err.contains("no integer category column"),
        "{err}"
    );
    // An OOD set is another repo in the same layout (its test split): here the same one.
    cfg.data.parquet.label_column = "label".into();
    cfg.data.ood = vec![liederiv::config::OodConfig {
        name: "again".into(),
        hub_repo: "someone/photos".into(),
        rotate: false,
        ..Default::default()
    }];
    let again = data::load_split(&cfg, "ood_again").unwrap();
    assert_eq!((again.len(), again.classes.len()), (5, 5));
    cfg.data.ood[0].rotate = true;
    let err = data::load_split(&cfg, "ood_again").unwrap_err().to_string();
    assert!(err.contains("rotate = false"), "{err}");
    // Not cached, offline: the Hub error with what to do.
    cfg.data.parquet.repo = "someone/other".into();
    let err = data::load_split(&cfg, "test").unwrap_err().to_string();
    assert!(
        err.contains("someone/other") && err.contains("huggingface-cli download"),
        "{err}"
    );
}
