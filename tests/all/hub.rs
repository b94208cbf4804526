//! Models by name against a fake Hugging Face Hub on 127.0.0.1 that answers as
//! huggingface.co does (resolve URLs, LFS redirects to a CDN, `ETag` / `X-Linked-Etag`,
//! `X-Repo-Commit`, ranges), serving the tiny fixtures. No test touches the internet.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::common::{case_cli_args, cases, fixture, max_level_diff, rgb_bytes, temp_dir};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// How the fake Hub misbehaves for one file.
#[derive(Clone, Copy, PartialEq)]
enum Fault {
    None,
    /// The first download is cut after half the bytes (the connection drops).
    CutOnce,
    /// Every download sends other bytes of the same length.
    Corrupt,
}

struct HubState {
    /// `repo/path` -> content.
    files: HashMap<String, Vec<u8>>,
    faults: HashMap<String, Fault>,
    /// Downloads of each blob that started past byte 0 (resumes).
    resumed: Mutex<Vec<String>>,
    cuts: AtomicUsize,
    /// `http://127.0.0.1:PORT`: the Hub redirects LFS files to an absolute CDN URL.
    base: String,
}

struct FakeHub {
    url: String,
    state: Arc<HubState>,
    _runtime: tokio::runtime::Runtime,
}

fn sha256(b: &[u8]) -> String {
    sdw::output::sha256_hex(b).unwrap()
}

/// A file is LFS (redirected to the CDN, named by its sha256) when it is weights.
fn is_lfs(path: &str) -> bool {
    path.ends_with(".safetensors") || path.ends_with(".ckpt")
}

impl FakeHub {
    fn start(faults: &[(&str, Fault)]) -> FakeHub {
        let mut files = HashMap::new();
        files.insert(
            "sdw-test/tiny/tiny-sd-fp16.safetensors".into(),
            std::fs::read(fixture("tiny-sd-fp16.safetensors")).unwrap(),
        );
        files.insert("sdw-test/tiny/tiny-sd-fp16.ckpt".into(), std::fs::read(fixture("tiny-sd-fp16.ckpt")).unwrap());
        let model = fixture("model");
        for rel in [
            "model_index.json",
            "scheduler/scheduler_config.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/config.json",
            "text_encoder/model.safetensors",
        ] {
            files.insert(format!("sdw-test/tiny-diffusers/{rel}"), std::fs::read(model.join(rel)).unwrap());
        }
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(HubState {
            files,
            faults: faults.iter().map(|(k, f)| (k.to_string(), *f)).collect(),
            resumed: Mutex::new(Vec::new()),
            cuts: AtomicUsize::new(0),
            base: url.clone(),
        });
        let app = Router::new()
            .route("/{org}/{name}/resolve/{rev}/{*file}", get(resolve))
            .route("/cdn/{*key}", get(cdn))
            .with_state(state.clone());
        runtime.spawn(async move { axum::serve(listener, app).await.unwrap() });
        FakeHub { url, state, _runtime: runtime }
    }
}

/// `/{repo}/resolve/main/{file}`: LFS files redirect to the CDN with their sha256 as
/// `X-Linked-Etag`; small files are served here with a git-style ETag.
async fn resolve(
    State(s): State<Arc<HubState>>,
    UrlPath((org, name, rev, file)): UrlPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let key = format!("{org}/{name}/{file}");
    let Some(bytes) = s.files.get(&key) else {
        return (StatusCode::NOT_FOUND, [("x-error-code", "EntryNotFound")], "Entry not found").into_response();
    };
    assert_eq!(rev, "main");
    if is_lfs(&file) {
        let sha = sha256(bytes);
        return Response::builder()
            .status(StatusCode::FOUND)
            .header(header::LOCATION, format!("{}/cdn/{key}", s.base))
            .header("x-linked-etag", format!("\"{sha}\""))
            .header("x-linked-size", bytes.len())
            .header("x-repo-commit", COMMIT)
            .header(header::ETAG, format!("\"{}\"", &sha[..40]))
            .body(Body::empty())
            .unwrap();
    }
    let mut resp = ranged(bytes, &headers);
    let h = resp.headers_mut();
    h.insert(header::ETAG, format!("\"{}\"", &sha256(bytes)[..40]).parse().unwrap());
    h.insert("x-repo-commit", COMMIT.parse().unwrap());
    resp
}

/// The CDN: the bytes with Range support, and the configured faults.
async fn cdn(State(s): State<Arc<HubState>>, UrlPath(key): UrlPath<String>, headers: HeaderMap) -> Response {
    let bytes = s.files.get(&key).expect("redirected to a known file");
    let range = range_start(&headers);
    if range > 0 {
        s.resumed.lock().unwrap().push(key.clone());
    }
    let is_probe = headers.get(header::RANGE).is_some_and(|r| r == "bytes=0-0");
    match s.faults.get(&key).copied().unwrap_or(Fault::None) {
        Fault::Corrupt if !is_probe => {
            let mut bad = bytes.clone();
            bad.iter_mut().for_each(|b| *b = b.wrapping_add(1));
            ranged(&bad, &headers)
        }
        Fault::CutOnce if !is_probe && s.cuts.fetch_add(1, Ordering::SeqCst) == 0 => {
            // Promise everything, send half, then drop the connection.
            let half = bytes[..bytes.len() / 2].to_vec();
            let stream = cut_stream(half);
            Response::builder()
                .status(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_LENGTH, bytes.len())
                .header(header::CONTENT_RANGE, format!("bytes 0-{}/{}", bytes.len() - 1, bytes.len()))
                .body(Body::from_stream(stream))
                .unwrap()
        }
        _ => ranged(bytes, &headers),
    }
}

/// A body of `data` that ends with an I/O error (the connection is cut).
fn cut_stream(data: Vec<u8>) -> impl futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send {
    struct Cut(Option<Vec<u8>>, bool);
    impl futures_core::Stream for Cut {
        type Item = Result<Vec<u8>, std::io::Error>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            if let Some(d) = self.0.take() {
                return std::task::Poll::Ready(Some(Ok(d)));
            }
            if !self.1 {
                self.1 = true;
                return std::task::Poll::Ready(Some(Err(std::io::Error::other("cut"))));
            }
            std::task::Poll::Ready(None)
        }
    }
    Cut(Some(data), false)
}

fn range_start(headers: &HeaderMap) -> usize {
    headers
        .get(header::RANGE)
        .and_then(|r| r.to_str().ok())
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split('-').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// 206 with `Content-Range` for a `Range: bytes=a-[b]` request (416 past the end), else 200.
fn ranged(bytes: &[u8], headers: &HeaderMap) -> Response {
    let n = bytes.len();
    let Some(spec) = headers.get(header::RANGE).and_then(|r| r.to_str().ok()).and_then(|r| r.strip_prefix("bytes="))
    else {
        return (StatusCode::OK, bytes.to_vec()).into_response();
    };
    let (a, b) = spec.split_once('-').unwrap();
    let start: usize = a.parse().unwrap();
    let end: usize = if b.is_empty() { n - 1 } else { b.parse::<usize>().unwrap().min(n - 1) };
    if start >= n {
        return Response::builder()
            .status(StatusCode::RANGE_NOT_SATISFIABLE)
            .header(header::CONTENT_RANGE, format!("bytes */{n}"))
            .body(Body::empty())
            .unwrap();
    }
    Response::builder()
        .status(StatusCode::PARTIAL_CONTENT)
        .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{n}"))
        .body(Body::from(bytes[start..=end].to_vec()))
        .unwrap()
}

/// `sdw` with the Hub variables pointing at the fake Hub and a fresh cache in `home`.
fn sdw(home: &Path, endpoint: &str, env: &[(&str, &str)], args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdw"))
        .current_dir(home)
        .env("SDW_CACHE_DIR", home.join("sdw-cache"))
        .env("HF_HOME", home.join("hf"))
        .env("HF_ENDPOINT", endpoint)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_TOKEN")
        .envs(env.iter().copied())
        .args(args)
        .output()
        .unwrap()
}

fn txt2img(home: &Path, endpoint: &str, env: &[(&str, &str)], model: &str, out: &str) -> Output {
    let case = &cases()["cases"]["txt2img.euler_a"];
    let mut args: Vec<String> = vec!["txt2img".into(), "--model".into(), model.into()];
    args.extend(case_cli_args(case));
    args.extend(["--device".into(), "cpu".into(), "--output".into(), out.into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    sdw(home, endpoint, env, &args)
}

fn assert_golden(home: &Path, out: &str, o: &Output) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "sdw failed: {err}");
    let worst = max_level_diff(&rgb_bytes(&home.join(out)), &rgb_bytes(&fixture("txt2img-euler_a.png")));
    assert!(worst <= 2, "{worst} levels from the golden image");
}

fn blob(home: &Path, repo: &str, content: &[u8]) -> PathBuf {
    home.join("hf/hub").join(format!("models--{}", repo.replace('/', "--"))).join("blobs").join(sha256(content))
}

#[test]
fn a_hub_file_downloads_generates_then_works_offline() {
    let hub = FakeHub::start(&[]);
    let home = temp_dir("hub-file");
    let model = "sdw-test/tiny/tiny-sd-fp16.safetensors";
    let o = txt2img(&home, &hub.url, &[], model, "a.png");
    assert_golden(&home, "a.png", &o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("downloading sdw-test/tiny/tiny-sd-fp16.safetensors (") && err.contains("MB)"), "{err}");
    let content = &hub.state.files["sdw-test/tiny/tiny-sd-fp16.safetensors"];
    assert!(blob(&home, "sdw-test/tiny", content).is_file(), "the blob is in Python's cache layout");
    let snapshot = home.join(format!("hf/hub/models--sdw-test--tiny/snapshots/{COMMIT}/tiny-sd-fp16.safetensors"));
    assert!(snapshot.exists());

    // A .ckpt from the Hub goes through the same restricted pickle reader as a local one.
    let o = txt2img(&home, &hub.url, &[], "sdw-test/tiny/tiny-sd-fp16.ckpt", "ckpt.png");
    assert_golden(&home, "ckpt.png", &o);

    // Offline, with the Hub gone: the cache alone.
    drop(hub);
    let o = txt2img(&home, "http://127.0.0.1:9", &[("HF_HUB_OFFLINE", "1")], model, "b.png");
    assert_golden(&home, "b.png", &o);
    // Offline and not cached: a clear error, no network.
    let o = txt2img(&home, "http://127.0.0.1:9", &[("HF_HUB_OFFLINE", "1")], "sdw-test/other/x.safetensors", "c.png");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("HF_HUB_OFFLINE=1"), "{err}");

    // `sdw models` lists the cached file.
    let o = sdw(&home, "http://127.0.0.1:9", &[], &["models"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && out.contains("sdw-test/tiny/tiny-sd-fp16.safetensors"), "{out}");
}

#[test]
fn a_hub_diffusers_repo_fetches_only_what_sdw_reads() {
    let hub = FakeHub::start(&[]);
    let home = temp_dir("hub-diffusers");
    let o = txt2img(&home, &hub.url, &[], "sdw-test/tiny-diffusers", "a.png");
    assert_golden(&home, "a.png", &o);
    let snapshot = home.join(format!("hf/hub/models--sdw-test--tiny-diffusers/snapshots/{COMMIT}"));
    assert!(snapshot.join("unet/diffusion_pytorch_model.safetensors").exists());
    assert!(!snapshot.join("tokenizer").exists(), "the tokenizer is built in: not fetched");
}

#[test]
fn a_cut_download_resumes_and_a_corrupt_one_is_refused() {
    let cut = "sdw-test/tiny/tiny-sd-fp16.safetensors";
    let corrupt = "sdw-test/tiny-diffusers/unet/diffusion_pytorch_model.safetensors";
    let hub = FakeHub::start(&[(cut, Fault::CutOnce), (corrupt, Fault::Corrupt)]);
    let home = temp_dir("hub-faults");
    let o = txt2img(&home, &hub.url, &[], cut, "a.png");
    assert_golden(&home, "a.png", &o);
    assert!(hub.state.resumed.lock().unwrap().iter().any(|k| k == cut), "the second request resumed mid-file");

    let o = txt2img(&home, &hub.url, &[], "sdw-test/tiny-diffusers", "b.png");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a corrupt download must fail");
    assert!(err.contains("unet/diffusion_pytorch_model.safetensors") && err.contains("corrupt"), "{err}");
    let content = &hub.state.files[corrupt];
    assert!(!blob(&home, "sdw-test/tiny-diffusers", content).exists(), "the bad file was not kept");
    assert!(!home.join("b.png").exists());
}

#[test]
fn without_model_the_models_folder_then_the_default_is_used() {
    let home = temp_dir("hub-default");
    // Nothing local, offline: the error names the default model and why it is not there.
    let o = sdw(&home, "http://127.0.0.1:9", &[("HF_HUB_OFFLINE", "1")], &["txt2img", "-p", "x", "--steps", "1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("v1-5-pruned-emaonly.safetensors"), "{err}");
    // A checkpoint in models/Stable-diffusion is used without --model.
    std::fs::create_dir_all(home.join("models/Stable-diffusion")).unwrap();
    std::fs::copy(fixture("tiny-sd-fp16.safetensors"), home.join("models/Stable-diffusion/tiny.safetensors")).unwrap();
    let case = &cases()["cases"]["txt2img.euler_a"];
    let mut args = vec!["txt2img".to_string()];
    args.extend(case_cli_args(case));
    args.extend(["--device", "cpu", "--output", "a.png"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = sdw(&home, "http://127.0.0.1:9", &[("HF_HUB_OFFLINE", "1")], &args);
    assert_golden(&home, "a.png", &o);
    let o = sdw(&home, "http://127.0.0.1:9", &[], &["models"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("tiny.safetensors") && out.contains("safetensors"), "{out}");
}
