//! The one thread that owns the model: jobs queue up and run one at a time, while the
//! progress, interrupt and skip routes read and set [`Shared`] without waiting.
//!
//! The model is loaded on the first job that needs it and kept until a job asks for
//! another checkpoint or VAE. A panic inside a job (burn reports GPU out-of-memory that
//! way) fails that job only; the model is dropped so the next job starts clean.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Instant;

use image::{GrayImage, RgbImage};
use serde::Serialize;

use crate::device::Compute;
use crate::lora::{self, Lora};
use crate::models_dir::{Entry, ModelsDir};
use crate::output;
use crate::pipeline::{Generated, GenerationParams, InitImage, Mask, StableDiffusion, image_input};
use crate::sampling::Progress;

use super::a1111::{Finished, Img2ImgSettings, ModelInfo, Request};
use super::error::ApiError;
use super::training::TrainJob;

/// What the progress route reports (A1111's `shared.state.dict()`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    pub skipped: bool,
    pub interrupted: bool,
    pub job: String,
    pub job_count: usize,
    pub job_no: usize,
    pub job_timestamp: String,
    pub sampling_step: usize,
    pub sampling_steps: usize,
    #[serde(skip)]
    pub started: Option<Instant>,
    /// Jobs waiting behind the running one.
    #[serde(skip)]
    pub queued: usize,
}

/// State the worker and the routes share.
#[derive(Default)]
pub struct Shared {
    pub status: Mutex<Status>,
    pub interrupt: AtomicBool,
    pub skip: AtomicBool,
    /// Set on Ctrl-C: the running job stops after its current step, new ones are refused.
    pub stopping: AtomicBool,
    /// The latest training run, for the web UI's Train tab.
    pub training: Mutex<super::training::TrainStatus>,
    /// Set by the Train tab's Cancel (and Ctrl-C): the run saves a checkpoint and stops.
    pub train_stop: AtomicBool,
    /// The running job's latest denoised latent (its first image), for the live preview.
    pub preview: Mutex<Option<Preview>>,
}

impl Shared {
    /// Whether a job (generation or training) is running now.
    pub fn busy(&self) -> bool {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).started.is_some()
    }

    pub fn status(&self) -> Status {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// A generation to run.
pub struct GenerateJob {
    pub request: Request,
    pub input: Option<Img2ImgInput>,
    pub checkpoint: Entry,
    pub vae: Option<Entry>,
    /// Where `save_images` writes (`<outdir>/txt2img`, ...).
    pub outdir: PathBuf,
}

/// img2img's images, decoded, at their own size.
pub struct Img2ImgInput {
    pub image: RgbImage,
    pub mask: Option<GrayImage>,
    pub settings: Img2ImgSettings,
}

/// A finished job: the images with their infotexts, what `info` reports, and the files
/// written.
pub struct JobOutput {
    pub images: Vec<(output::RgbImage, String)>,
    pub finished: Finished,
    pub model: ModelInfo,
    pub params: GenerationParams,
    pub saved: Vec<PathBuf>,
}

enum Job {
    Generate { work: GenerateJob, reply: tokio::sync::oneshot::Sender<Result<JobOutput, ApiError>> },
    Train(TrainJob),
}

#[derive(Clone)]
pub struct Worker {
    tx: mpsc::Sender<Job>,
    pub shared: Arc<Shared>,
}

impl Worker {
    /// Starts the worker thread on `compute`.
    pub fn start(compute: Compute, models: ModelsDir) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let shared = Arc::new(Shared::default());
        let state = shared.clone();
        std::thread::Builder::new()
            .name("sdw-worker".into())
            .spawn(move || run(rx, &state, &compute, &models))
            .expect("spawning the worker thread");
        Self { tx, shared }
    }

    /// Queues `job` and waits for it. A client that goes away drops the wait, not the job.
    pub async fn submit(&self, work: GenerateJob) -> Result<JobOutput, ApiError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send(Job::Generate { work, reply })?;
        rx.await.map_err(|_| ApiError::internal("the worker thread has stopped"))?
    }

    /// Queues a training run; its progress is in [`Shared::training`].
    pub fn submit_train(&self, job: TrainJob) -> Result<(), ApiError> {
        self.send(Job::Train(job))
    }

    fn send(&self, job: Job) -> Result<(), ApiError> {
        if self.shared.stopping.load(Ordering::SeqCst) {
            return Err(ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "HTTPException",
                "the server is shutting down",
            ));
        }
        self.shared.update(|s| s.queued += 1);
        self.tx.send(job).map_err(|_| ApiError::internal("the worker thread has stopped"))
    }
}

/// The model a job ran on.
struct Loaded {
    checkpoint: PathBuf,
    vae: Option<PathBuf>,
    sd: StableDiffusion,
    /// The LoRAs merged now (files with their modification times, strengths) and their
    /// infotext hashes: a job asking for the same set skips reading, hashing and merging.
    /// `None` after a failed merge: the weights are then in an unknown state.
    loras: Option<MergedLoras>,
    info: ModelInfo,
}

fn run(rx: mpsc::Receiver<Job>, shared: &Shared, compute: &Compute, models: &ModelsDir) {
    let mut loaded: Option<Loaded> = None;
    while let Ok(job) = rx.recv() {
        if shared.stopping.load(Ordering::SeqCst) {
            // Ctrl-C: what is still queued is refused, not started.
            if let Job::Generate { reply, .. } = job {
                let _ = reply.send(Err(ApiError::internal("the server stopped before this job started")));
            }
            continue;
        }
        shared.interrupt.store(false, Ordering::SeqCst);
        shared.skip.store(false, Ordering::SeqCst);
        let (kind, job_count) = match &job {
            Job::Generate { work, .. } => {
                (if work.input.is_some() { "img2img" } else { "txt2img" }, work.request.n_iter)
            }
            Job::Train(_) => ("train", 1),
        };
        let timestamp = timestamp();
        shared.update(|s| {
            s.queued = s.queued.saturating_sub(1);
            *s = Status {
                job: format!("scripts_{kind}"),
                job_count,
                job_timestamp: timestamp.clone(),
                started: Some(Instant::now()),
                queued: s.queued,
                ..Default::default()
            };
        });
        let mut answer = None;
        match job {
            Job::Generate { work, reply } => {
                let result =
                    guarded(&mut loaded, |loaded| generate(loaded, &work, shared, compute, models, &timestamp));
                answer = Some((reply, result));
            }
            Job::Train(job) => {
                // Training loads its own copy of the model: free this one's memory first.
                loaded = None;
                let result = guarded(&mut loaded, |_| {
                    super::training::run(&job, shared);
                    Ok(())
                });
                if let Err(e) = result {
                    shared.training.lock().unwrap_or_else(|e| e.into_inner()).fail(e.detail);
                }
            }
        }
        shared.update(|s| {
            let queued = s.queued;
            *s = Status { queued, job_timestamp: s.job_timestamp.clone(), ..Default::default() };
        });
        *shared.preview.lock().unwrap_or_else(|e| e.into_inner()) = None;
        // After the status is idle again, so a client that got its reply sees it idle. The
        // client may have gone; the images are saved (if asked) either way.
        if let Some((reply, result)) = answer {
            let _ = reply.send(result);
        }
    }
}

/// Runs `f`, turning a panic (burn reports GPU out-of-memory that way) into a 500 and
/// dropping the model, which the panic may have left half-updated.
fn guarded<T>(
    loaded: &mut Option<Loaded>,
    f: impl FnOnce(&mut Option<Loaded>) -> Result<T, ApiError>,
) -> Result<T, ApiError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(loaded))).unwrap_or_else(|panic| {
        *loaded = None;
        let msg = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        Err(ApiError::internal(format!("the job failed: {msg}")))
    })
}

fn generate(
    loaded: &mut Option<Loaded>,
    job: &GenerateJob,
    shared: &Shared,
    compute: &Compute,
    models: &ModelsDir,
    timestamp: &str,
) -> Result<JobOutput, ApiError> {
    let model = load(loaded, job, compute, models)?;
    let mut params = job.request.params.clone();
    params.lora_hashes = apply_loras(model, &params.prompt, models)?;
    model.sd.check(&params)?;

    let kind = if job.input.is_some() { "img2img" } else { "txt2img" };
    let mut out = JobOutput {
        images: Vec::new(),
        finished: Finished { job_timestamp: timestamp.to_owned(), ..Default::default() },
        model: model.info.clone(),
        params: job.request.params.clone(),
        saved: Vec::new(),
    };
    out.finished.denoising_strength =
        job.input.as_ref().map(|i| i.settings.denoising_strength).or(params.hires.map(|h| h.denoising_strength));
    let mut p = params;
    for batch in 0..job.request.n_iter {
        if shared.interrupt.load(Ordering::SeqCst) {
            break;
        }
        shared.skip.store(false, Ordering::SeqCst);
        shared.update(|s| s.job_no = batch);
        let mut progress = JobProgress { shared, params: &p };
        let generated = match &job.input {
            None => model.sd.txt2img(&p, &mut progress)?,
            Some(input) => img2img(&model.sd, &p, input, &mut progress)?,
        };
        if let Some(i) = generated.overflowed() {
            return Err(ApiError::internal(format!(
                "image {} decoded to NaN or pure black: {}",
                i + 1,
                generated.overflow_remedy(i, model.sd.compute.dtypes)
            )));
        }
        out.finished.seeds.extend(p.seeds());
        out.finished.subseeds.extend(p.subseeds().map_or_else(|| vec![0; p.batch_size], |(s, _)| s));
        for (i, seed) in p.seeds().into_iter().enumerate() {
            let image = generated.rgb8(i);
            let text = generated.infotexts[i].clone();
            if job.request.save_images {
                let path = output::next_in_dir(&job.outdir.join(kind), seed)
                    .and_then(|path| output::write_png(&path, &image, &text).map(|()| path))
                    .map_err(|e| ApiError::internal(format!("saving the image: {e}")))?;
                out.saved.push(path);
            }
            out.finished.infotexts.push(text.clone());
            out.images.push((image, text));
        }
        p = p.next_batch();
    }
    Ok(out)
}

fn img2img(
    sd: &StableDiffusion,
    p: &GenerationParams,
    input: &Img2ImgInput,
    progress: &mut dyn Progress,
) -> Result<Generated, ApiError> {
    let s = &input.settings;
    let (w, h) = (p.width as u32, p.height as u32);
    let mask = input.mask.as_ref().map(|m| {
        let mut m = m.clone();
        if s.invert_mask {
            image::imageops::invert(&mut m);
        }
        m
    });
    if let (Some(mask), true) = (&mask, s.only_masked) {
        let (iw, ih) = input.image.dimensions();
        let mask = image_input::resize(mask, crate::pipeline::ResizeMode::JustResize, iw, ih);
        let mask = Mask { mask, blur: s.mask_blur, fill: s.fill };
        return Ok(sd.inpaint_full_res(p, &input.image, &mask, s.denoising_strength, s.padding, progress)?);
    }
    let init = InitImage {
        image: image_input::resize(&input.image, s.resize_mode, w, h),
        denoising_strength: s.denoising_strength,
        mask: mask.map(|m| Mask {
            mask: image_input::resize(&m, s.resize_mode, w, h),
            blur: s.mask_blur,
            fill: s.fill,
        }),
    };
    Ok(sd.img2img(p, &init, progress)?)
}

/// The model the job asks for, loading it (and dropping the old one) when it changed.
fn load<'a>(
    loaded: &'a mut Option<Loaded>,
    job: &GenerateJob,
    compute: &Compute,
    models: &ModelsDir,
) -> Result<&'a mut Loaded, ApiError> {
    let vae = job.vae.as_ref().map(|e| e.path.clone());
    let current = loaded.as_ref().is_some_and(|l| l.checkpoint == job.checkpoint.path && l.vae == vae);
    if !current {
        // Free the old model's memory before loading the new one.
        *loaded = None;
        crate::device::release_freed_weights(&compute.device);
        eprintln!("loading {}", job.checkpoint.path.display());
        let mut sd = StableDiffusion::load(&job.checkpoint.path, compute.clone())?;
        if let Some(v) = &vae {
            sd.load_vae(v)?;
        }
        let embeddings = models.embeddings_dir();
        if embeddings.is_dir() {
            sd.load_embeddings(&embeddings).map_err(|e| ApiError::internal(e.to_string()))?;
        }
        let hash = sd.short_hash();
        let info = ModelInfo { name: sd.model_name(), hash, vae: sd.vae_name.clone(), inpainting: sd.is_inpainting() };
        *loaded =
            Some(Loaded { checkpoint: job.checkpoint.path.clone(), vae, sd, info, loras: Some(Default::default()) });
    }
    Ok(loaded.as_mut().expect("loaded above"))
}

type MergedLoras = (Vec<(PathBuf, Option<std::time::SystemTime>, lora::Strength)>, Vec<(String, String)>);

/// Merges the LoRAs the prompt's `<lora:NAME:WEIGHT>` tags name (from the models folder)
/// into the model, unless they are merged already; returns their infotext hashes.
fn apply_loras(model: &mut Loaded, prompt: &str, models: &ModelsDir) -> Result<Vec<(String, String)>, ApiError> {
    let (_, tags) = lora::extract_tags(prompt).map_err(ApiError::unprocessable)?;
    let mut wanted = Vec::new();
    for tag in tags {
        let path = models.lora(&tag.name)?.path;
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        wanted.push((path, modified, tag.strength));
    }
    if let Some((merged, hashes)) = &model.loras
        && *merged == wanted
    {
        return Ok(hashes.clone());
    }
    let mut loras = Vec::new();
    let mut hashes = Vec::new();
    for (path, _, strength) in &wanted {
        let l = Lora::open(path).map_err(|e| ApiError::unprocessable(e.to_string()))?;
        let hash = lora::addnet_hash(path).map_err(|e| ApiError::internal(e.to_string()))?;
        hashes.push((l.name(), hash));
        loras.push((l, *strength));
    }
    model.loras = None;
    model.sd.set_loras(&loras).map_err(|e| ApiError::unprocessable(e.to_string()))?;
    model.loras = Some((wanted, hashes.clone()));
    Ok(hashes)
}

/// Sampling progress into [`Shared`]; the interrupt and skip flags stop the sampler.
struct JobProgress<'a> {
    shared: &'a Shared,
    params: &'a GenerationParams,
}

impl Progress for JobProgress<'_> {
    fn step(&mut self, done: usize, total: usize) {
        self.shared.update(|s| {
            s.sampling_step = done;
            s.sampling_steps = total;
        });
    }

    fn denoised(&mut self, x0: &[f32]) {
        let p = self.params;
        // The latent's size: the first pass's, or the hires pass's (same aspect ratio).
        let plane = x0.len() / (4 * p.batch_size.max(1));
        let h = ((plane * p.height) as f64 / p.width as f64).sqrt().round() as usize;
        let w = plane / h.max(1);
        if h * w != plane {
            return;
        }
        // Only kept here: the image is made when a client asks for it, not at every step.
        let preview = Preview { latent: x0[..4 * plane].to_vec(), height: h, width: w };
        *self.shared.preview.lock().unwrap_or_else(|e| e.into_inner()) = Some(preview);
    }

    fn stop(&self) -> bool {
        self.shared.interrupt.load(Ordering::SeqCst) || self.shared.skip.load(Ordering::SeqCst)
    }
}

/// A denoised latent `[4, height, width]` waiting to be shown.
#[derive(Clone, Debug)]
pub struct Preview {
    latent: Vec<f32>,
    height: usize,
    width: usize,
}

impl Preview {
    /// A1111's "Approx cheap" preview as a base64 PNG.
    pub fn png_base64(&self) -> Option<String> {
        super::images::encode_png(&cheap_preview(&self.latent, self.height, self.width), "").ok()
    }
}

/// A1111's "Approx cheap" live preview: a fixed linear map from the 4 latent channels to
/// RGB, at latent size (1/8 of the image).
fn cheap_preview(latent: &[f32], h: usize, w: usize) -> output::RgbImage {
    const COEFS: [[f32; 3]; 4] =
        [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]];
    let plane = h * w;
    let mut pixels = Vec::with_capacity(plane * 3);
    for i in 0..plane {
        let v = COEFS.iter().enumerate().fold([0f32; 3], |acc, (l, row)| {
            let x = latent[l * plane + i];
            [acc[0] + x * row[0], acc[1] + x * row[1], acc[2] + x * row[2]]
        });
        pixels.extend(v.map(|v| ((v * 0.5 + 0.5).clamp(0.0, 1.0) * 255.0) as u8));
    }
    output::RgbImage { width: w, height: h, pixels }
}

/// A1111's `job_timestamp`: local time as `YYYYmmddHHMMSS` (UTC here: no time-zone data).
fn timestamp() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!("{y:04}{m:02}{d:02}{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    #[test]
    fn civil_dates() {
        assert_eq!(super::civil_from_days(0), (1970, 1, 1));
        assert_eq!(super::civil_from_days(20_783), (2026, 11, 26));
        assert_eq!(super::civil_from_days(11_016), (2000, 2, 29));
    }
}
