//! `sdw bench`: where the time of one image goes (CLIP, one CFG UNet step, VAE decode, a
//! whole txt2img), cold (first use in the process: kernel compilation and autotune) and warm,
//! with peak memory. Without a model file it uses random weights of the exact SD 1.5 shapes,
//! so any two machines can be compared.

use std::time::Instant;

use burn::tensor::{DType, Tensor};
use rand::{SeedableRng, rngs::StdRng};
use serde::Serialize;

use crate::model::layers::to_host;
use crate::pipeline::denoiser::CfgDenoiser;
use crate::pipeline::{GenerationParams, PipelineError, StableDiffusion};
use crate::sampling::NoProgress;
use crate::train::adapters::{UNET_PREFIX, attach_new, named};
use crate::train::recorded::Steps;
use crate::train::step::{AdamWOptimizer, Conditioning, Draws, Trainable, optimiser_step};
use crate::weights::HostTensor;

/// A part of one image that `sdw bench` can time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    Clip,
    Unet,
    Vae,
    Txt2img,
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchSettings {
    /// The parts to time, in the order of an image.
    pub parts: Vec<Part>,
    pub size: usize,
    pub steps: usize,
    pub batch: usize,
    /// Warm repetitions of each part (their mean is reported).
    pub repeats: usize,
    /// Also time one DreamBooth-LoRA training step (rank 4, every UNet attention, `batch`
    /// instance images and as many prior-preservation images).
    pub train: bool,
    /// ... with burn's balanced gradient checkpointing (`sdw train --gradient-checkpointing`).
    pub gradient_checkpointing: bool,
}

/// Seconds of one part, first call and warm mean, and how many cores the warm runs kept
/// busy (CPU time over wall time, in percent: 200 is two cores; `None` where unknown).
#[derive(Clone, Debug, Serialize)]
pub struct Timing {
    pub part: String,
    pub cold_s: f64,
    pub warm_s: f64,
    pub warm_cpu_percent: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub device: String,
    pub model: String,
    pub size: usize,
    pub steps: usize,
    pub batch: usize,
    pub load_s: f64,
    pub timings: Vec<Timing>,
    /// UNet steps per second at CFG (batch x 2 through the UNet), warm.
    pub it_per_s: f64,
    /// Bytes the GPU allocator held at most (`None` on the CPU backend).
    pub peak_device_bytes: Option<u64>,
    /// The process's peak resident memory (Linux).
    pub peak_host_bytes: Option<u64>,
    /// Microseconds per small kernel issued back to back on a GPU ([`launch_us`]; `None` on
    /// the CPU backend).
    pub launch_us: Option<f64>,
    /// The same kernels recorded as a graph and replayed ([`replayed_launch_us`]), as a UNet
    /// step is after its first two (`None` on the CPU backend or with `SDW_GRAPHS=off`).
    pub replayed_launch_us: Option<f64>,
}

/// Times each part on an already loaded model, reporting progress through `say`.
pub fn run(
    sd: &StableDiffusion,
    s: &BenchSettings,
    load_s: f64,
    say: &mut dyn FnMut(&str),
) -> Result<BenchReport, PipelineError> {
    let peak = crate::device::PeakDeviceMemory::new(&sd.compute.device);
    let mut timings = Vec::new();
    let dev = sd.compute.device.clone();
    let seconds = |f: &mut dyn FnMut()| {
        let start = Instant::now();
        f();
        // Every part reads its result back, so this wait costs nothing; it also closes a
        // table of cubecl's kernel profile (`[profiling.logger]`) per run.
        let _ = dev.sync();
        start.elapsed().as_secs_f64()
    };
    let mut time = |part: &str, f: &mut dyn FnMut()| {
        say(&format!("{part}: first run (on a GPU this compiles and tunes kernels)"));
        // The first run allocates what the warm ones take again: it alone is watched.
        let cold = peak.during(|| seconds(&mut *f));
        say(&format!("{part}: {cold:.3} s cold, {} warm run(s)", s.repeats));
        let cpu_before = crate::device::process_cpu_seconds();
        // NaN (JSON null, "-" in the table) when no warm run was asked for.
        let warm = (0..s.repeats).map(|_| seconds(&mut *f)).sum::<f64>() / s.repeats as f64;
        peak.read();
        let cpu = cpu_before.zip(crate::device::process_cpu_seconds()).map(|(a, b)| b - a);
        let warm_cpu_percent = cpu.filter(|_| s.repeats > 0).map(|c| 100.0 * c / (warm * s.repeats as f64));
        if s.repeats > 0 {
            say(&format!("{part}: {warm:.3} s warm"));
        }
        timings.push(Timing { part: part.to_owned(), cold_s: cold, warm_s: warm, warm_cpu_percent });
    };

    let latent = s.size / 8;
    let timed = |part| s.parts.contains(&part);
    if timed(Part::Clip) {
        time("CLIP (prompt + negative)", &mut || {
            let c = Tensor::cat(vec![sd.encode_prompt("a photo of a cat", 1), sd.encode_prompt("", 1)], 0);
            to_host(c);
        });
    }
    if timed(Part::Unet) {
        // A sampler's call: the UNet on both halves and the guidance, as a graph of kernels
        // where they are recorded (`model::graph`), which the first run also does.
        let (cond, uncond) = (sd.encode_prompt("a photo of a cat", 1), sd.encode_prompt("", 1));
        let shape = [s.batch, 4, latent, latent];
        let mut denoiser = CfgDenoiser::scheduled(&sd.unet, vec![(0, cond)], vec![(0, uncond)], 7.0, shape);
        let x = noise(shape).data;
        let recorded = crate::model::graph::enabled(&dev);
        let mut runs = 0;
        let note = if recorded { ", recorded as a graph by the first run" } else { "" };
        time(&format!("UNet step (CFG batch {}{note})", 2 * s.batch), &mut || {
            runs += 1;
            if runs == 1 && recorded {
                denoiser.eps(&x, 500.0);
            }
            denoiser.eps(&x, 500.0);
        });
    }
    let z = HostTensor::new(vec![s.batch, 4, latent, latent], noise([s.batch, 4, latent, latent]).data);
    if timed(Part::Vae) {
        time("VAE decode", &mut || {
            sd.decode(&z).expect("decode");
        });
    }
    let p = GenerationParams {
        prompt: "a photo of a cat".into(),
        steps: s.steps,
        width: s.size,
        height: s.size,
        batch_size: s.batch,
        ..Default::default()
    };
    let mut failure = None;
    if timed(Part::Txt2img) {
        time(&format!("txt2img {} steps", s.steps), &mut || {
            if let Err(e) = sd.txt2img(&p, &mut NoProgress) {
                failure = Some(e);
            }
        });
    }
    if let Some(e) = failure {
        return Err(e);
    }
    if s.train {
        let part = if s.gradient_checkpointing { "LoRA training step, checkpointed" } else { "LoRA training step" };
        let (mut step, recorded) = train_step(sd, s);
        let note = if recorded { ", recorded as a graph by the first run" } else { "" };
        let mut runs = 0;
        time(&format!("{part} (rank 4, {} + {} prior{note})", s.batch, s.batch), &mut || {
            runs += 1;
            if runs == 1 && recorded {
                step();
            }
            step();
        });
    }
    let unet_warm = timings.iter().find(|t| t.part.starts_with("UNet")).map_or(f64::NAN, |t| t.warm_s);
    Ok(BenchReport {
        device: sd.compute.summary(),
        model: sd.model_path.display().to_string(),
        size: s.size,
        steps: s.steps,
        batch: s.batch,
        load_s,
        it_per_s: 1.0 / unet_warm,
        timings,
        peak_device_bytes: peak.peak(),
        peak_host_bytes: crate::device::peak_host_memory(),
        launch_us: launch_us(&dev),
        replayed_launch_us: replayed_launch_us(&dev),
    })
}

/// Kernels [`launch_us`] issues: 500, so that its profiler table never outnumbers a UNet step's.
const LAUNCHES: usize = 500;

/// `n` additions of `one` in a row, each a kernel of its own.
fn additions(one: &Tensor<1>, n: usize) -> Tensor<1> {
    (0..n).fold(one.clone(), |sum, _| sum + one.clone())
}

/// Microseconds per small kernel on a GPU: [`LAUNCHES`] additions of 4096 floats issued back
/// to back, then one wait. Each kernel passes through burn, cubecl, wgpu and the driver, and
/// the GPU runs it in next to no time, so this is what the stack costs per kernel at least: a
/// UNet step of about a thousand kernels cannot take less than a thousand times it.
fn launch_us(dev: &burn::tensor::Device) -> Option<f64> {
    if !crate::device::on_cube(dev) {
        return None;
    }
    let one = Tensor::<1>::ones([4096], dev);
    let time = |n: usize| {
        let start = Instant::now();
        let sum = additions(&one, n);
        dev.sync().ok()?;
        drop(sum);
        Some(start.elapsed().as_secs_f64() * 1e6 / n as f64)
    };
    time(50)?; // compiles the kernel
    time(LAUNCHES)
}

/// [`launch_us`]'s additions recorded as a graph (`model::graph`) and replayed: what the stack
/// costs per kernel when a step replays its recording.
fn replayed_launch_us(dev: &burn::tensor::Device) -> Option<f64> {
    if !crate::model::graph::enabled(dev) {
        return None;
    }
    let one = Tensor::<1>::ones([4096], dev);
    let (_, recorded) = crate::model::graph::run_then_record(dev, || additions(&one, LAUNCHES), |sum| sum.into_data());
    let (graph, sum) = recorded.ok()?;
    let replay = || {
        let start = Instant::now();
        // SAFETY: `one` and `sum`, all the recording used, live until after the waits below.
        unsafe { graph.replay() }.ok()?;
        dev.sync().ok()?;
        Some(start.elapsed().as_secs_f64() * 1e6 / LAUNCHES as f64)
    };
    replay()?; // the first replay uploads what the recording staged
    // The best of three: on lavapipe one replay takes 18 to 85 us per kernel, as its threads wake.
    let us = (0..3).filter_map(|_| replay()).min_by(f64::total_cmp);
    drop(sum);
    us
}

/// One training step closure: a fresh rank-4 LoRA on a clone of the UNet, forward, backward and
/// AdamW's update (`sdw train`'s defaults), on `batch` instance images and as many
/// prior-preservation images (as diffusers' reference, `bench_reference.py --train-lora`,
/// measures it, its `AdamW` step included); and whether its steps are recorded as a graph from
/// the second on (`train::recorded`), as `sdw train`'s are.
fn train_step<'a>(sd: &'a StableDiffusion, s: &BenchSettings) -> (impl FnMut() + 'a, bool) {
    let (latent, instances) = (s.size / 8, s.batch);
    let shape = [2 * instances, 4, latent, latent];
    let dev = sd.compute.device.clone();
    // Training computes in f32 (`Compute::for_training`), with the weights of inference.
    let mut unet = sd.unet.clone().computing_in(DType::F32);
    let grad_device =
        if s.gradient_checkpointing { dev.clone().autodiff().gradient_checkpointing() } else { dev.clone().autodiff() };
    attach_new(unet.attentions_mut(), 4, 4.0, &mut StdRng::seed_from_u64(0), &grad_device);
    let prompts = [sd.encode_prompt("photo of sks person", 1), sd.encode_prompt("photo of a person", 1)];
    let context = Conditioning::Fixed(Box::new(Tensor::cat(prompts.map(|c| c.repeat_dim(0, s.batch)).to_vec(), 0)));
    let acp = crate::sampling::schedule::alphas_cumprod();
    let mut optim = AdamWOptimizer::new(1e-2); // torch's default weight decay, as the reference's
    let mut steps = Steps::for_adapters(&dev, &named(unet.attentions(), UNET_PREFIX));
    let recorded = steps.recording();
    let step = move || {
        let (latents, noise) = (noise(shape).data, noise(shape).data);
        let draws = Draws::new(shape, latents, noise, &vec![500; shape[0]], &acp, &unet);
        let update = optim.next(1e-4);
        let mut model = Trainable { unet: &mut unet, text_encoder: None };
        // Reads the losses back: the step is done when the device has updated the factors.
        steps.run(&[draws], instances, update, &mut |batches, settings| {
            optimiser_step(&mut model, batches, &context, 1.0, &mut optim, settings)
        });
    };
    (step, recorded)
}

fn noise(shape: [usize; 4]) -> HostTensor {
    let n = shape.iter().product();
    HostTensor::new(shape.to_vec(), crate::sampling::Philox::new(1).randn(n))
}

impl BenchReport {
    /// A table for people.
    pub fn table(&self) -> String {
        let mut out = format!(
            "device: {}\nmodel: {}\n{}x{}, batch {}, load {:.2} s\n{:<36} {:>10} {:>10} {:>8}\n",
            self.device, self.model, self.size, self.size, self.batch, self.load_s, "part", "cold s", "warm s", "CPU %"
        );
        for t in &self.timings {
            let cpu = t.warm_cpu_percent.map_or("-".into(), |p| format!("{p:.0}"));
            let warm = if t.warm_s.is_nan() { "-".into() } else { format!("{:.3}", t.warm_s) };
            out += &format!("{:<36} {:>10.3} {:>10} {:>8}\n", t.part, t.cold_s, warm, cpu);
        }
        if self.it_per_s.is_finite() {
            out += &format!("UNet: {:.2} it/s (warm)\n", self.it_per_s);
        }
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        if let Some(b) = self.peak_device_bytes {
            out += &format!("peak device memory (allocator): {:.2} GiB\n", gib(b));
        }
        if let Some(b) = self.peak_host_bytes {
            out += &format!("peak host memory (RSS): {:.2} GiB\n", gib(b));
        }
        if let Some(us) = self.launch_us {
            out += &format!("kernel launch: {us:.1} us each ({LAUNCHES} small additions back to back)");
            if let Some(replayed) = self.replayed_launch_us {
                out += &format!(", {replayed:.1} us replayed as a recorded graph");
            }
            out += "\n";
        }
        out
    }
}
