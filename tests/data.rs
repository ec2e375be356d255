//! Data sources and the Hub client: IDX / `.amat` parsing and validation, MNIST-rot generation
//! and caching, the loader, and `hub::fetch` against a loopback mock Hub and a pre-populated
//! cache. Real-data tests read `LIEDERIV_DATA_DIR` and fail (not skip) when it is absent.

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
