//! The HTTP routes: A1111's `/sdapi/v1`, sdw's `/sdw/v1` (gallery), the saved images under
//! `/outputs/`, and the page. Every route sits behind `--api-auth` when it is set.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use burn::tensor::DType;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::device::{Compute, Dtypes};
use crate::models_dir::{Entry, ModelsDir, check_relative};
use crate::pipeline::Infotext;
use crate::sampling::{SAMPLERS, ScheduleKind};

use super::ServeOptions;
use super::a1111::{ImagesResponse, Img2ImgRequest, Request as GenRequest, Txt2ImgRequest, info_json};
use super::error::ApiError;
use super::images;
use super::training::{self, TrainRequest};
use super::worker::{GenerateJob, Img2ImgInput, JobOutput, Worker};

/// Largest request body: a few base64 photos and a mask.
const MAX_BODY: usize = 64 << 20;

pub struct App {
    pub worker: Worker,
    models: ModelsDir,
    outdir: PathBuf,
    auth: Vec<(String, String)>,
    cors: Vec<String>,
    training: training::TrainDevice,
    /// What generation computes in (`cmd-flags` reports it as A1111's `no_half`, `no_half_vae`).
    dtypes: Dtypes,
    /// A1111's options dict: the keys sdw acts on and whatever clients posted.
    options: Mutex<Map<String, Value>>,
}

type AppState = Arc<App>;

impl App {
    pub fn new(opts: ServeOptions, compute: Compute) -> AppState {
        let first = opts.models.checkpoints().into_iter().next();
        let options = json!({
            "sd_model_checkpoint": first.as_ref().map_or(String::new(), title),
            "sd_checkpoint_hash": "",
            "sd_vae": "Automatic",
            "CLIP_stop_at_last_layers": 1,
            "eta_noise_seed_delta": 0,
            "samples_format": "png",
            "enable_pnginfo": true,
            "live_previews_enable": true,
            "show_progress_every_n_steps": 1,
        });
        let Value::Object(options) = options else { unreachable!("a JSON object") };
        Arc::new(App {
            dtypes: compute.dtypes,
            worker: Worker::start(compute, opts.models.clone()),
            models: opts.models,
            outdir: opts.outdir,
            auth: opts.auth,
            cors: opts.cors_origins,
            training: opts.training,
            options: Mutex::new(options),
        })
    }

    fn options(&self) -> Map<String, Value> {
        self.options.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The checkpoint and VAE a job uses: the request's `override_settings`, else the options.
    fn model_for(&self, overrides: &Map<String, Value>) -> Result<(Entry, Option<Entry>), ApiError> {
        let options = self.options();
        let pick = |key: &str| overrides.get(key).or(options.get(key)).and_then(Value::as_str).unwrap_or("").to_owned();
        let name = pick("sd_model_checkpoint");
        let checkpoint = if name.is_empty() {
            self.models.checkpoints().into_iter().next().ok_or_else(|| {
                ApiError::not_found(format!(
                    "no checkpoint in {}: put a .safetensors or .ckpt there",
                    self.models.root.join(crate::models_dir::CHECKPOINTS).display()
                ))
            })?
        } else {
            self.models.checkpoint(&name)?
        };
        let vae = match pick("sd_vae").as_str() {
            "" | "Automatic" | "None" => None,
            name => Some(self.models.vae(name)?),
        };
        Ok((checkpoint, vae))
    }

    fn clip_skip(&self) -> usize {
        self.options().get("CLIP_stop_at_last_layers").and_then(Value::as_f64).map_or(1, |v| v.max(1.0) as usize)
    }
}

pub fn router(app: AppState) -> Router {
    let api = Router::new()
        .route("/sdapi/v1/txt2img", post(txt2img))
        .route("/sdapi/v1/img2img", post(img2img))
        .route("/sdapi/v1/progress", get(progress))
        .route("/sdapi/v1/interrupt", post(interrupt))
        .route("/sdapi/v1/skip", post(skip))
        .route("/sdapi/v1/sd-models", get(sd_models))
        .route("/sdapi/v1/refresh-checkpoints", post(refresh))
        .route("/sdapi/v1/samplers", get(samplers))
        .route("/sdapi/v1/schedulers", get(schedulers))
        .route("/sdapi/v1/loras", get(loras))
        .route("/sdapi/v1/refresh-loras", post(refresh))
        .route("/sdapi/v1/embeddings", get(embeddings))
        .route("/sdapi/v1/refresh-embeddings", post(refresh))
        .route("/sdapi/v1/sd-vae", get(sd_vae))
        .route("/sdapi/v1/refresh-vae", post(refresh))
        .route("/sdapi/v1/upscalers", get(upscalers))
        .route("/sdapi/v1/latent-upscale-modes", get(latent_upscale_modes))
        .route("/sdapi/v1/options", get(get_options).post(set_options))
        .route("/sdapi/v1/png-info", post(png_info))
        .route("/sdapi/v1/cmd-flags", get(cmd_flags))
        .route("/sdapi/v1/scripts", get(|| async { Json(json!({"txt2img": [], "img2img": []})) }))
        .route("/sdw/v1/gallery", get(gallery))
        .route("/sdw/v1/train", get(train_status).post(train))
        .route("/sdw/v1/train/cancel", post(train_cancel))
        .route("/outputs/{*path}", get(output_file))
        .route("/", get(|| async { Html(include_str!("ui/index.html")) }))
        .route("/ui/app.js", get(|| async { asset("text/javascript", include_str!("ui/app.js")) }))
        .route("/ui/style.css", get(|| async { asset("text/css", include_str!("ui/style.css")) }))
        .fallback(|| async { ApiError::not_found("Not Found") });
    let cors_origins = app.cors.clone();
    let router = api
        .layer(middleware::from_fn_with_state(app.clone(), auth))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(app);
    if cors_origins.is_empty() { router } else { router.layer(cors(&cors_origins)) }
}

fn asset(kind: &'static str, text: &'static str) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, kind)], text)
}

/// HTTP Basic auth against `--api-auth`; 401 in A1111's error shape (with the header a
/// browser needs to ask for the password).
async fn auth(State(app): State<AppState>, req: Request, next: Next) -> Response {
    if app.auth.is_empty() || authorized(&app.auth, req.headers()) {
        return next.run(req).await;
    }
    let mut resp =
        ApiError::new(StatusCode::UNAUTHORIZED, "HTTPException", "Incorrect username or password").into_response();
    resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"sdw\""));
    resp
}

fn authorized(users: &[(String, String)], headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else { return false };
    let Some(encoded) = value.strip_prefix("Basic ") else { return false };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else { return false };
    let Ok(text) = String::from_utf8(decoded) else { return false };
    let Some((user, pass)) = text.split_once(':') else { return false };
    users.iter().any(|(u, p)| u == user && constant_time_eq(p.as_bytes(), pass.as_bytes()))
}

/// Compares without returning early at the first differing byte (no timing hint).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `--cors-allow-origins`: the listed origins (or `*`) may call the API from their pages.
/// Outside the auth layer, so a browser's preflight needs no password.
fn cors(origins: &[String]) -> CorsLayer {
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::mirror_request()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| o.parse().ok()))
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION])
        .allow_credentials(true)
}

/// A JSON body: 413 past the limit, 422 when it does not parse.
fn body<T: DeserializeOwned>(bytes: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = bytes.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::too_large(format!("the request body is over {} MiB", MAX_BODY >> 20))
        }
        status => ApiError::new(status, "HTTPException", e.body_text()),
    })?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::unprocessable(format!("the request body: {e}")))
}

async fn txt2img(
    State(app): State<AppState>,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Json<ImagesResponse>, ApiError> {
    let req: Txt2ImgRequest = body(bytes)?;
    let request = req.to_request(app.clip_skip())?;
    let parameters = serde_json::to_value(&req).unwrap_or_default();
    run(&app, request, None, parameters).await
}

async fn img2img(
    State(app): State<AppState>,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Json<ImagesResponse>, ApiError> {
    let req: Img2ImgRequest = body(bytes)?;
    let request = req.common.to_request(app.clip_skip())?;
    let settings = req.settings()?;
    let init = match req.init_images.as_deref() {
        Some([first, ..]) => images::decode(first, "init_images[0]")?.to_rgb8(),
        _ => return Err(ApiError::not_found("Init image not found")),
    };
    let mask = match req.mask.as_deref().filter(|m| !m.is_empty()) {
        Some(m) => Some(images::decode(m, "mask")?.to_luma8()),
        None => None,
    };
    let mut parameters = serde_json::to_value(&req).unwrap_or_default();
    if !req.include_init_images.unwrap_or(false) {
        parameters["init_images"] = Value::Null;
        parameters["mask"] = Value::Null;
    }
    run(&app, request, Some(Img2ImgInput { image: init, mask, settings }), parameters).await
}

async fn run(
    app: &App,
    request: GenRequest,
    input: Option<Img2ImgInput>,
    parameters: Value,
) -> Result<Json<ImagesResponse>, ApiError> {
    let (checkpoint, vae) = app.model_for(&request.overrides)?;
    let send = request.send_images;
    let job = GenerateJob { request, input, checkpoint, vae, outdir: app.outdir.clone() };
    let out: JobOutput = app.worker.submit(job).await?;
    let info = info_json(&out.params, &out.finished, &out.model);
    let images = if send {
        out.images.iter().map(|(img, text)| images::encode_png(img, text)).collect::<Result<_, _>>()?
    } else {
        Vec::new()
    };
    Ok(Json(ImagesResponse { images, parameters, info }))
}

#[derive(Deserialize)]
struct ProgressQuery {
    #[serde(default)]
    skip_current_image: bool,
}

async fn progress(State(app): State<AppState>, Query(q): Query<ProgressQuery>) -> Json<Value> {
    let shared = &app.worker.shared;
    let mut s = shared.status();
    s.interrupted = shared.interrupt.load(std::sync::atomic::Ordering::SeqCst);
    s.skipped = shared.skip.load(std::sync::atomic::Ordering::SeqCst);
    let preview = if q.skip_current_image || s.job_count == 0 {
        None
    } else {
        let latest = shared.preview.lock().unwrap_or_else(|e| e.into_inner()).clone();
        latest.and_then(|p| p.png_base64())
    };
    let (mut progress, mut eta) = (0.0f64, 0.0f64);
    if s.job_count > 0 {
        let jobs = s.job_count as f64;
        progress = 0.01 + s.job_no as f64 / jobs;
        if s.sampling_steps > 0 {
            progress += s.sampling_step as f64 / s.sampling_steps as f64 / jobs;
        }
        progress = progress.min(1.0);
        let elapsed = s.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
        eta = elapsed / progress - elapsed;
    }
    Json(json!({
        "progress": progress,
        "eta_relative": eta,
        "state": s,
        "current_image": preview,
        "textinfo": null,
    }))
}

async fn interrupt(State(app): State<AppState>) -> Json<Value> {
    app.worker.shared.interrupt.store(true, std::sync::atomic::Ordering::SeqCst);
    Json(json!({}))
}

async fn skip(State(app): State<AppState>) -> Json<Value> {
    app.worker.shared.skip.store(true, std::sync::atomic::Ordering::SeqCst);
    Json(Value::Null)
}

/// The folders are read on every request, so the refresh routes have nothing to do.
async fn refresh() -> Json<Value> {
    Json(Value::Null)
}

/// A1111's checkpoint title: `name [shorthash]` once the hash is known.
fn title(e: &Entry) -> String {
    title_with(e, crate::output::cached_model_hash(&e.path).as_deref())
}

fn title_with(e: &Entry, sha256: Option<&str>) -> String {
    match sha256 {
        Some(h) => format!("{} [{}]", e.name, &h[..10]),
        None => e.name.clone(),
    }
}

async fn sd_models(State(app): State<AppState>) -> Json<Value> {
    let list: Vec<Value> = app
        .models
        .checkpoints()
        .iter()
        .map(|e| {
            let sha = crate::output::cached_model_hash(&e.path);
            json!({
                "title": title_with(e, sha.as_deref()),
                "model_name": e.model_name(),
                "hash": sha.as_ref().map(|h| h[..10].to_string()),
                "sha256": sha,
                "filename": e.path.display().to_string(),
                "config": null,
            })
        })
        .collect();
    Json(Value::Array(list))
}

/// Every sampler of the registry under its A1111 name; `options.scheduler` is what its
/// "Automatic" schedule means, as A1111 lists it.
async fn samplers() -> Json<Value> {
    let list = SAMPLERS
        .iter()
        .map(|e| {
            let mut options = Map::new();
            if e.automatic != ScheduleKind::Normal {
                options.insert("scheduler".into(), json!(e.automatic.a1111_name().to_lowercase()));
            }
            let aliases: Vec<&str> = std::iter::once(e.cli).chain(e.aliases.iter().copied()).collect();
            json!({ "name": e.a1111, "aliases": aliases, "options": options })
        })
        .collect();
    Json(Value::Array(list))
}

async fn schedulers() -> Json<Value> {
    let s = |name: &str, label: &str, rho: f64, inner: bool| json!({"name": name, "label": label, "aliases": null, "default_rho": rho, "need_inner_model": inner});
    Json(json!([
        s("automatic", "Automatic", -1.0, false),
        s("uniform", "Uniform", -1.0, true),
        s("karras", "Karras", 7.0, false),
        s("exponential", "Exponential", -1.0, false),
    ]))
}

async fn loras(State(app): State<AppState>) -> Json<Value> {
    let list: Vec<Value> = app
        .models
        .loras()
        .iter()
        .map(|e| json!({"name": e.stem(), "alias": e.stem(), "path": e.path.display().to_string(), "metadata": {}}))
        .collect();
    Json(Value::Array(list))
}

async fn embeddings(State(app): State<AppState>) -> Result<Json<Value>, ApiError> {
    let dir = app.models.embeddings_dir();
    let (mut loaded, mut skipped) = (Map::new(), Map::new());
    if dir.is_dir() {
        for (path, result) in crate::embeddings::scan_dir(&dir).map_err(|e| ApiError::internal(e.to_string()))? {
            let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            match result {
                Ok(e) => {
                    let entry = json!({"step": null, "sd_checkpoint": null, "sd_checkpoint_name": null,
                                       "shape": e.width, "vectors": e.count()});
                    loaded.insert(e.name.clone(), entry);
                }
                Err(_) => {
                    skipped.insert(
                        stem,
                        json!({"step": null, "sd_checkpoint": null, "sd_checkpoint_name": null,
                                                "shape": 0, "vectors": 0}),
                    );
                }
            }
        }
    }
    Ok(Json(json!({"loaded": loaded, "skipped": skipped})))
}

async fn sd_vae(State(app): State<AppState>) -> Json<Value> {
    let list: Vec<Value> = app
        .models
        .vaes()
        .iter()
        .map(|e| json!({"model_name": e.name, "filename": e.path.display().to_string()}))
        .collect();
    Json(Value::Array(list))
}

async fn upscalers() -> Json<Value> {
    Json(json!([{"name": "None", "model_name": null, "model_path": null, "model_url": null, "scale": 4}]))
}

async fn latent_upscale_modes() -> Json<Value> {
    Json(json!([{"name": "Latent"}]))
}

async fn get_options(State(app): State<AppState>) -> Json<Value> {
    Json(Value::Object(app.options()))
}

/// Stores the options; the ones sdw acts on are checked first, so a bad name changes
/// nothing. A client may post the whole dict back unchanged.
async fn set_options(
    State(app): State<AppState>,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let mut posted: Map<String, Value> = body(bytes)?;
    if let Some(name) = posted.get("sd_model_checkpoint").and_then(Value::as_str).filter(|n| !n.is_empty()) {
        let entry = app.models.checkpoint(name)?;
        posted.insert("sd_model_checkpoint".into(), json!(title(&entry)));
    }
    if let Some(name) = posted.get("sd_vae").and_then(Value::as_str)
        && !matches!(name, "Automatic" | "None" | "")
    {
        app.models.vae(name)?;
    }
    if let Some(v) = posted.get("CLIP_stop_at_last_layers")
        && v.as_f64().is_none_or(|n| !(1.0..=12.0).contains(&n))
    {
        return Err(ApiError::unprocessable(format!("CLIP_stop_at_last_layers must be 1..12, got {v}")));
    }
    app.options.lock().unwrap_or_else(|e| e.into_inner()).extend(posted);
    Ok(Json(Value::Null))
}

#[derive(Deserialize)]
struct PngInfoRequest {
    image: String,
}

async fn png_info(bytes: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let req: PngInfoRequest = body(bytes)?;
    let Some(text) = images::parameters(&req.image)? else {
        return Ok(Json(json!({"info": "", "items": {}, "parameters": {}})));
    };
    let it = Infotext::parse(&text);
    let mut params = Map::new();
    params.insert("Prompt".into(), json!(it.prompt));
    params.insert("Negative prompt".into(), json!(it.negative_prompt));
    for (k, v) in &it.params {
        params.insert(k.clone(), json!(v));
        if let (Some(w), Some(h)) = (it.get(&format!("{k}-1")), it.get(&format!("{k}-2"))) {
            params.insert(format!("{k}-1"), json!(w));
            params.insert(format!("{k}-2"), json!(h));
        }
    }
    Ok(Json(json!({"info": text, "items": {}, "parameters": params})))
}

async fn cmd_flags(State(app): State<AppState>) -> Json<Value> {
    Json(json!({
        "api": true,
        "nowebui": false,
        "ckpt_dir": app.models.root.join(crate::models_dir::CHECKPOINTS).display().to_string(),
        "lora_dir": app.models.lora_dir().display().to_string(),
        "embeddings_dir": app.models.embeddings_dir().display().to_string(),
        "api_auth": if app.auth.is_empty() { Value::Null } else { json!("<set>") },
        "no_half": app.dtypes.weights == DType::F32,
        "no_half_vae": app.dtypes.vae == DType::F32,
    }))
}

/// Starts a DreamBooth-LoRA run (202); `GET /sdw/v1/train` follows it.
async fn train(
    State(app): State<AppState>,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req: TrainRequest = body(bytes)?;
    let (checkpoint, _) = app.model_for(&Map::new())?;
    let (models, outdir, training) = (app.models.clone(), app.outdir.clone(), app.training);
    // Decoding and saving a dozen photos is blocking work: off the async threads.
    let job = tokio::task::spawn_blocking(move || training::prepare(req, &models, &outdir, &checkpoint, training))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    training::enqueue(&app.worker.shared, &job)?;
    app.worker.submit_train(job)?;
    Ok((StatusCode::ACCEPTED, Json(training_report(&app))))
}

async fn train_status(State(app): State<AppState>) -> Json<Value> {
    Json(training_report(&app))
}

fn training_report(app: &App) -> Value {
    app.worker.shared.training.lock().unwrap_or_else(|e| e.into_inner()).report(&app.outdir)
}

/// Stops the run after its current step; it saves a checkpoint to resume from.
async fn train_cancel(State(app): State<AppState>) -> Json<Value> {
    app.worker.shared.train_stop.store(true, std::sync::atomic::Ordering::SeqCst);
    Json(training_report(&app))
}

/// The saved images of txt2img and img2img, newest first, with their infotexts.
async fn gallery(State(app): State<AppState>) -> Json<Value> {
    let mut files = Vec::new();
    for kind in ["txt2img", "img2img"] {
        collect_pngs(&app.outdir, &app.outdir.join(kind), &mut files);
    }
    files.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
    let list: Vec<Value> = files
        .into_iter()
        .take(500)
        .map(|(name, _)| {
            let infotext = crate::output::read_parameters(&app.outdir.join(&name)).ok().flatten().unwrap_or_default();
            json!({"name": name, "url": format!("/outputs/{name}"), "infotext": infotext})
        })
        .collect();
    Json(Value::Array(list))
}

fn collect_pngs(root: &Path, dir: &Path, out: &mut Vec<(String, std::time::SystemTime)>) {
    let Ok(read) = std::fs::read_dir(dir) else { return };
    for e in read.flatten() {
        let path = e.path();
        let Ok(kind) = e.file_type() else { continue };
        if kind.is_dir() {
            collect_pngs(root, &path, out);
        } else if path.extension().is_some_and(|x| x == "png") {
            let modified = e.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
            let name = path.strip_prefix(root).unwrap_or(&path).to_string_lossy().replace('\\', "/");
            out.push((name, modified));
        }
    }
}

async fn output_file(
    State(app): State<AppState>,
    axum::extract::Path(path): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    check_relative(&path)?;
    if !path.ends_with(".png") {
        return Err(ApiError::not_found("only saved PNGs are served"));
    }
    let bytes = tokio::fs::read(app.outdir.join(&path)).await.map_err(|_| ApiError::not_found("no such image"))?;
    Ok(([(header::CONTENT_TYPE, "image/png")], bytes).into_response())
}
