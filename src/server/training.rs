//! DreamBooth-LoRA from the web UI. The photos go to `<outdir>/train/<name>-photos/`, the
//! run (loss log and plot, validation grids, checkpoints) to `<outdir>/train/<name>-training/`,
//! and the finished LoRA into the models folder's `Lora/`, where the LoRA list shows it.
//! A cancelled run keeps its checkpoint; the same name with `resume` continues it.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::device::{DeviceChoice, Precision};
use crate::models_dir::{Entry, ModelsDir};
use crate::output;
use crate::train::{TrainError, TrainOptions, run::run_dir};

use super::error::ApiError;
use super::images;
use super::worker::Shared;

/// Most photos one run takes (DreamBooth wants 5-20).
const MAX_PHOTOS: usize = 100;

#[derive(Debug, Deserialize)]
pub struct TrainRequest {
    /// The LoRA's name: `<lora:NAME>` in prompts.
    pub name: String,
    /// e.g. "photo of sks person".
    pub instance_prompt: Option<String>,
    /// Prior preservation, e.g. "photo of a person" (class images are generated first).
    pub class_prompt: Option<String>,
    /// The photos, base64 or data URLs (none when resuming).
    #[serde(default)]
    pub images: Vec<String>,
    pub steps: Option<usize>,
    pub resolution: Option<usize>,
    pub rank: Option<usize>,
    pub learning_rate: Option<f64>,
    /// Steps between validation grids (default: a quarter of the run).
    pub validation_every: Option<usize>,
    pub validation_prompt: Option<String>,
    pub num_validation_images: Option<usize>,
    pub seed: Option<u64>,
    /// Continue the cancelled run of this name.
    #[serde(default)]
    pub resume: bool,
}

/// A run ready for the worker.
pub struct TrainJob {
    opts: TrainOptions,
    name: String,
    /// Where the finished LoRA goes (`<models>/Lora/<name>.safetensors`).
    dest: PathBuf,
}

/// What the Train tab shows: the latest run's state.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TrainStatus {
    /// idle, queued, running, done, cancelled or failed.
    pub state: &'static str,
    pub name: String,
    pub total: usize,
    pub error: Option<String>,
    /// The finished LoRA's file name in the models folder.
    pub lora: Option<String>,
    #[serde(skip)]
    run_dir: Option<PathBuf>,
}

impl TrainStatus {
    pub fn fail(&mut self, error: String) {
        self.state = "failed";
        self.error = Some(error);
    }

    /// The status with the run's loss log and the URLs of its validation grids and plot.
    pub fn report(&self, outdir: &Path) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if self.state.is_empty() {
            v["state"] = json!("idle");
        }
        let Some(dir) = &self.run_dir else { return v };
        let losses = read_losses(&dir.join("loss.csv"));
        v["step"] = json!(losses.last().map_or(0, |l| l[0] as usize));
        v["losses"] = json!(losses);
        let url = |p: &Path| {
            p.strip_prefix(outdir).ok().map(|r| format!("/outputs/{}", r.to_string_lossy().replace('\\', "/")))
        };
        let mut grids: Vec<PathBuf> = std::fs::read_dir(dir.join("validation"))
            .map(|r| r.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "png")).collect())
            .unwrap_or_default();
        grids.sort();
        v["validation"] = json!(grids.iter().filter_map(|p| url(p)).collect::<Vec<_>>());
        let plot = dir.join("loss.png");
        v["loss_plot"] = json!(plot.exists().then(|| url(&plot)).flatten());
        v
    }
}

/// `[step, loss, smoothed loss]` rows of a run's `loss.csv`.
fn read_losses(csv: &Path) -> Vec<[f64; 3]> {
    let Ok(text) = std::fs::read_to_string(csv) else { return Vec::new() };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<f64> = line.split(',').map(|x| x.parse().unwrap_or(f64::NAN)).collect();
            (f.len() >= 6).then(|| [f[0], f[1], f[5]])
        })
        .collect()
}

/// The device and precision a training run takes: those `sdw serve` generates with
/// (`--precision f16` keeps the frozen weights in f16 there).
#[derive(Clone, Copy, Debug)]
pub struct TrainDevice {
    pub device: DeviceChoice,
    pub precision: Precision,
}

/// Checks the request, saves the photos and builds the run's options; `checkpoint` is
/// the base model. 409 when the name is taken (nothing a user made is overwritten).
pub fn prepare(
    req: TrainRequest,
    models: &ModelsDir,
    outdir: &Path,
    checkpoint: &Entry,
    on: TrainDevice,
) -> Result<TrainJob, ApiError> {
    let name = req.name.trim();
    let plain = !name.is_empty() && name.chars().all(|c| c.is_alphanumeric() || "-_. ".contains(c));
    if !plain || name.starts_with('.') {
        return Err(ApiError::unprocessable(format!("name {name:?}: use letters, digits, '-', '_', '.' and spaces")));
    }
    let conflict = |m: String| ApiError::new(axum::http::StatusCode::CONFLICT, "HTTPException", m);
    let dest = models.lora_dir().join(format!("{name}.safetensors"));
    if dest.exists() {
        return Err(conflict(format!("a LoRA named {name:?} exists; choose another name")));
    }
    let root = outdir.join("train");
    let output = root.join(format!("{name}.safetensors"));
    let run = run_dir(&output);
    let photos = root.join(format!("{name}-photos"));
    let mut args: Vec<String> = vec!["train".into()];
    let mut arg = |k: &str, v: String| args.extend([format!("--{k}"), v]);
    if req.resume {
        if !run.join("checkpoints").is_dir() {
            return Err(ApiError::not_found(format!("no run named {name:?} to resume")));
        }
        arg("resume", run.display().to_string());
    } else {
        if run.exists() {
            return Err(conflict(format!("a run named {name:?} exists: resume it or choose another name")));
        }
        save_photos(&req.images, &photos)?;
    }
    let Some(instance_prompt) = req.instance_prompt.clone().filter(|p| !p.trim().is_empty()) else {
        return Err(ApiError::unprocessable("instance_prompt is required, e.g. \"photo of sks person\""));
    };
    let steps = req.steps.unwrap_or(800);
    arg("model", checkpoint.path.display().to_string());
    arg("instance-dir", photos.display().to_string());
    arg("instance-prompt", instance_prompt);
    arg("output", output.display().to_string());
    arg("max-train-steps", steps.to_string());
    arg("resolution", req.resolution.unwrap_or(512).to_string());
    arg("rank", req.rank.unwrap_or(4).to_string());
    arg("learning-rate", req.learning_rate.unwrap_or(1e-4).to_string());
    arg("validation-every", req.validation_every.unwrap_or((steps / 4).max(1)).to_string());
    arg("num-validation-images", req.num_validation_images.unwrap_or(2).to_string());
    arg("checkpoint-every", (steps / 4).max(1).to_string());
    arg("seed", req.seed.unwrap_or(0).to_string());
    arg("device", format!("{:?}", on.device).to_lowercase());
    arg("precision", format!("{:?}", on.precision).to_lowercase());
    if let Some(p) = &req.validation_prompt {
        arg("validation-prompt", p.clone());
    }
    if let Some(p) = req.class_prompt.filter(|p| !p.trim().is_empty()) {
        arg("class-prompt", p);
        arg("class-dir", root.join(format!("{name}-class")).display().to_string());
    }
    let opts = TrainOptions::try_parse_from_args(&args).map_err(|e| ApiError::unprocessable(e.to_string()))?;
    opts.validate().map_err(ApiError::unprocessable)?;
    Ok(TrainJob { opts, name: name.to_owned(), dest })
}

/// Decodes every photo first (a bad one refuses the run), then writes them as PNGs.
fn save_photos(images: &[String], dir: &Path) -> Result<(), ApiError> {
    if images.is_empty() || images.len() > MAX_PHOTOS {
        return Err(ApiError::unprocessable(format!("send 1 to {MAX_PHOTOS} photos (got {})", images.len())));
    }
    let decoded = images
        .iter()
        .enumerate()
        .map(|(i, b64)| images::decode(b64, &format!("images[{i}]")).map(|img| img.to_rgb8()))
        .collect::<Result<Vec<_>, _>>()?;
    std::fs::create_dir_all(dir).map_err(|e| ApiError::internal(format!("{}: {e}", dir.display())))?;
    for (i, img) in decoded.iter().enumerate() {
        let path = output::fresh_path(&dir.join(format!("{:03}.png", i + 1)));
        img.save(&path).map_err(|e| ApiError::internal(format!("{}: {e}", path.display())))?;
    }
    Ok(())
}

/// Marks the run queued (refusing a second one while one is queued or running).
pub fn enqueue(shared: &Shared, job: &TrainJob) -> Result<(), ApiError> {
    let mut status = shared.training.lock().unwrap_or_else(|e| e.into_inner());
    if matches!(status.state, "queued" | "running") {
        return Err(ApiError::new(
            axum::http::StatusCode::CONFLICT,
            "HTTPException",
            format!("the run {:?} is still {}; cancel it first", status.name, status.state),
        ));
    }
    // A Cancel pressed while the run waits in the queue must still stop it.
    shared.train_stop.store(false, Ordering::SeqCst);
    *status = TrainStatus {
        state: "queued",
        name: job.name.clone(),
        total: job.opts.max_train_steps,
        run_dir: Some(run_dir(&job.opts.output)),
        ..Default::default()
    };
    Ok(())
}

/// Runs on the worker thread: trains, then moves the LoRA into the models folder.
pub fn run(job: &TrainJob, shared: &Shared) {
    let set = |f: &dyn Fn(&mut TrainStatus)| f(&mut shared.training.lock().unwrap_or_else(|e| e.into_inner()));
    set(&|s| s.state = "running");
    match crate::train::train_until(job.opts.clone(), &shared.train_stop) {
        Ok(path) => match install(&path, &job.dest) {
            Ok(dest) => set(&|s| {
                s.state = "done";
                s.lora = dest.file_name().map(|n| n.to_string_lossy().into_owned());
            }),
            Err(e) => set(&|s| s.fail(format!("installing the LoRA: {e}"))),
        },
        Err(TrainError::Interrupted { .. }) => set(&|s| s.state = "cancelled"),
        Err(e) => set(&|s| s.fail(e.to_string())),
    }
}

/// Copies the finished LoRA into `Lora/` under a name no file has.
fn install(path: &Path, dest: &Path) -> std::io::Result<PathBuf> {
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let dest = output::fresh_path(dest);
    std::fs::copy(path, &dest)?;
    Ok(dest)
}
