//! `sdw train` from start to finish: class images, training loop, logs, validation,
//! checkpoints, Ctrl-C, and the final LoRA file.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::device;
use crate::output;
use crate::pipeline::StableDiffusion;

use super::data;
use super::report::{self, Progress};
use super::run::{Trainer, run_dir};
use super::state::{self, Checkpoint};
use super::{TrainError, TrainOptions};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Trains and writes the LoRA; returns its path. On Ctrl-C, saves a checkpoint and returns
/// [`TrainError::Interrupted`].
pub fn train(opts: TrainOptions) -> Result<PathBuf, TrainError> {
    let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst));
    train_until(opts, &INTERRUPTED)
}

/// [`train`], stopping (with a checkpoint to resume from) once `stop` is set.
pub fn train_until(opts: TrainOptions, stop: &AtomicBool) -> Result<PathBuf, TrainError> {
    opts.validate().map_err(TrainError::Options)?;
    data::check_readable(&data::list_images(&opts.instance_dir)?)?;
    let (resume, dir) = open_run(&opts)?;
    let compute = device::select(opts.device)
        .and_then(|c| c.with_precision(opts.precision))
        .map_err(|e| TrainError::Model(e.to_string()))?
        .for_training();
    eprintln!("device: {}", compute.summary());
    // A Hub name works here too (--model is required: no models folder is searched).
    let model = crate::hub::locate(&opts.model.to_string_lossy()).map_err(|e| TrainError::Model(format!("{e:#}")))?;
    let mut sd = StableDiffusion::load(&model, compute)
        .map_err(|e| TrainError::Model(format!("loading {}: {e}", model.display())))?;
    if let (Some(prompt), Some(class_dir)) = (&opts.class_prompt, &opts.class_dir) {
        generate_class_images(&mut sd, &opts, prompt, class_dir)?;
    }
    let mut t = Trainer::new(opts, sd, resume.as_ref())?;
    eprintln!(
        "training {} adapters ({} steps from step {}); run folder {}",
        t.adapters().len(),
        t.opts.max_train_steps,
        t.step,
        dir.display()
    );
    let result = train_loop(&mut t, &dir, stop);
    let (csv, png) = (dir.join("loss.csv"), dir.join("loss.png"));
    if let Err(e) = report::plot_csv(&csv, &png) {
        eprintln!("warning: could not plot {}: {e}", png.display());
    }
    result?;
    let out = output::fresh_path(&t.opts.output);
    if out != t.opts.output {
        eprintln!("note: {} exists; writing {} instead", t.opts.output.display(), out.display());
    }
    t.save_lora(&out)?;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    if let Some(peak) = crate::device::peak_host_memory() {
        eprintln!("peak host memory: {:.0} MiB", mib(peak));
    }
    if let Some(bytes) = t.peak_device_bytes() {
        eprintln!("peak device memory held by the allocator: {:.0} MiB", mib(bytes));
    }
    Ok(out)
}

/// The run folder and, when resuming, the checkpoint to continue from.
fn open_run(opts: &TrainOptions) -> Result<(Option<Checkpoint>, PathBuf), TrainError> {
    let io = |p: &Path, e: std::io::Error| TrainError::Io(format!("{}: {e}", p.display()));
    let Some(from) = &opts.resume else {
        let dir = output::fresh_path(&run_dir(&opts.output));
        std::fs::create_dir_all(dir.join("checkpoints")).map_err(|e| io(&dir, e))?;
        return Ok((None, dir));
    };
    let path = state::latest_checkpoint(from)?;
    let ck = state::load_checkpoint(&path)?;
    for (key, value) in [
        ("sdw_rank", opts.rank.to_string()),
        ("sdw_seed", opts.seed.to_string()),
        ("sdw_train_text_encoder", opts.train_text_encoder.to_string()),
    ] {
        if let Some(saved) = ck.metadata.get(key).filter(|v| **v != value) {
            let flag = key.trim_start_matches("sdw_").replace('_', "-");
            return Err(TrainError::Resume(format!("{} was made with --{flag} {saved}, not {value}", path.display())));
        }
    }
    let dir = path.parent().and_then(Path::parent).map(Path::to_owned).unwrap_or_else(|| PathBuf::from("."));
    report::truncate_csv(&dir.join("loss.csv"), ck.step).map_err(|e| io(&dir, e))?;
    eprintln!("resuming from {} (step {})", path.display(), ck.step);
    Ok((Some(ck), dir))
}

fn train_loop(t: &mut Trainer, dir: &Path, stop: &AtomicBool) -> Result<(), TrainError> {
    let total = t.opts.max_train_steps;
    let mut progress = Progress::new(t.step, total);
    let csv = dir.join("loss.csv");
    while t.step < total {
        let loss = t.train_step();
        if !loss.loss.is_finite() {
            t.save_checkpoint(&state::checkpoint_path(&dir.join("checkpoints"), t.step))?;
            return Err(TrainError::Model(format!(
                "the loss became {} at step {}; lower --learning-rate",
                loss.loss, t.step
            )));
        }
        let smoothed = progress.update(t.step, &loss);
        report::append_csv(&csv, t.step, &loss, smoothed)
            .map_err(|e| TrainError::Io(format!("{}: {e}", csv.display())))?;
        let step = t.step;
        let every = |n: usize| n > 0 && step.is_multiple_of(n);
        if every(t.opts.validation_every) {
            validate(t, dir)?;
        }
        let interrupted = stop.load(Ordering::SeqCst);
        if every(t.opts.checkpoint_every) || step == total || interrupted {
            let path = state::checkpoint_path(&dir.join("checkpoints"), t.step);
            t.save_checkpoint(&path)?;
            let _ = report::plot_csv(&csv, &dir.join("loss.png"));
            if interrupted {
                return Err(TrainError::Interrupted { step: t.step, dir: dir.to_owned() });
            }
        }
    }
    Ok(())
}

/// A grid of validation images with fixed seeds, so the subject can be watched appearing.
fn validate(t: &mut Trainer, dir: &Path) -> Result<(), TrainError> {
    let prompt = t.opts.validation_prompt.clone().unwrap_or_else(|| t.opts.instance_prompt.clone());
    let images = t.sample_images(&prompt, t.opts.num_validation_images)?;
    let path = dir.join("validation").join(format!("step-{:06}.png", t.step));
    std::fs::create_dir_all(path.parent().unwrap()).map_err(|e| TrainError::Io(e.to_string()))?;
    report::grid(&images, t.opts.resolution)
        .save(&path)
        .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
    eprintln!("validation images: {}", path.display());
    Ok(())
}

/// Prior preservation: generates the class images the folder lacks with the base model,
/// as diffusers does before training.
pub fn generate_class_images(
    sd: &mut StableDiffusion,
    opts: &TrainOptions,
    prompt: &str,
    dir: &Path,
) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::Io(format!("{}: {e}", dir.display())))?;
    let have = data::list_images(dir).map(|v| v.len()).unwrap_or(0);
    if have >= opts.num_class_images {
        return Ok(());
    }
    let missing = opts.num_class_images - have;
    eprintln!("generating {missing} class images for \"{prompt}\" in {}", dir.display());
    for i in 0..missing {
        let seed = opts.seed.wrapping_add((have + i) as u64);
        let p = opts.sample_params(prompt, seed);
        let g = sd.txt2img(&p, &mut crate::sampling::NoProgress).map_err(|e| TrainError::Model(e.to_string()))?;
        let img = output::to_rgb8(&g.image.data, opts.resolution, opts.resolution);
        let path = output::fresh_path(&dir.join(format!("class-{:05}.png", have + i)));
        output::write_png(&path, &img, &g.infotexts[0])
            .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
        eprintln!("class image {}/{missing}", i + 1);
    }
    Ok(())
}
