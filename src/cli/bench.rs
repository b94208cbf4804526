//! `sdw bench`: timings of one image's parts, as a table or JSON.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;

use crate::bench::{self, BenchSettings, Part};
use crate::pipeline::StableDiffusion;
use crate::weights::synthetic::Architecture;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// A checkpoint to time; default: random weights with the exact SD 1.5 shapes (no file).
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    compute: super::ComputeArgs,
    /// Image side in pixels (a multiple of 8).
    #[arg(long, default_value_t = 512)]
    size: usize,
    /// Sampling steps of the whole-image run.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Images per batch (the UNet sees twice as many, for CFG).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Warm repetitions of each part.
    #[arg(long, default_value_t = 2)]
    repeats: usize,
    /// The parts to time (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Part::Clip, Part::Unet, Part::Vae, Part::Txt2img])]
    parts: Vec<Part>,
    /// Also time one DreamBooth-LoRA training step.
    #[arg(long)]
    train: bool,
    /// Time that step with gradient checkpointing, as `sdw train --gradient-checkpointing`.
    #[arg(long, requires = "train")]
    gradient_checkpointing: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    if a.size < 64 || !a.size.is_multiple_of(8) {
        anyhow::bail!("--size must be a multiple of 8 and at least 64 (got {})", a.size);
    }
    if a.steps == 0 || a.batch == 0 {
        anyhow::bail!("--steps and --batch must be at least 1");
    }
    let compute = a.compute.select()?;
    eprintln!("device: {}", compute.summary());
    let start = Instant::now();
    let sd = match &a.model {
        Some(path) => StableDiffusion::load(path, compute).with_context(|| format!("loading {}", path.display()))?,
        None => {
            eprintln!("making random weights with the SD 1.5 shapes (1.07 G parameters)");
            StableDiffusion::random(&Architecture::sd15(), 0, compute)?
        }
    };
    let load_s = start.elapsed().as_secs_f64();
    eprintln!("model ready in {load_s:.1} s");
    let settings = BenchSettings {
        parts: a.parts,
        size: a.size,
        steps: a.steps,
        batch: a.batch,
        repeats: a.repeats,
        train: a.train,
        gradient_checkpointing: a.gradient_checkpointing,
    };
    let report = bench::run(&sd, &settings, load_s, &mut |line| eprintln!("{line}"))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}
