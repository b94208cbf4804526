//! Using sdw as a library: load a checkpoint, generate, save an A1111-style PNG.
//!
//! cargo run --release --example txt2img -- MODEL.safetensors "a photo of a cat" [cpu|wgpu|auto]

use std::path::Path;
use std::time::Instant;

use sdw::device::{self, DeviceChoice};
use sdw::output;
use sdw::pipeline::{GenerationParams, StableDiffusion};
use sdw::sampling::{NoProgress, Sampler};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (model, prompt) = match &args[..] {
        [_, m, p, ..] => (m.clone(), p.clone()),
        _ => anyhow::bail!("usage: txt2img MODEL PROMPT [cpu|wgpu|auto]"),
    };
    let choice = match args.get(3).map(String::as_str) {
        Some("cpu") => DeviceChoice::Cpu,
        Some("wgpu") => DeviceChoice::Wgpu,
        _ => DeviceChoice::Auto,
    };
    let compute = device::select(choice)?;
    println!("device: {}", compute.description);
    let sd = StableDiffusion::load(Path::new(&model), compute)?;
    let size = if sd.unet.config().block_out_channels[0] >= 320 { 512 } else { 64 };
    let params = GenerationParams {
        prompt,
        negative_prompt: "blurry, lowres".into(),
        sampler: Sampler::parse("DPM++ 2M Karras").map_err(anyhow::Error::msg)?,
        steps: 20,
        cfg_scale: 7.0,
        seed: 42,
        width: size,
        height: size,
        clip_skip: 1,
        lora_hashes: Vec::new(),
        ..Default::default()
    };
    let t = Instant::now();
    let out = sd.txt2img(&params, &mut NoProgress)?;
    println!("{} steps in {:.2}s", params.steps, t.elapsed().as_secs_f64());
    let img = output::to_rgb8(&out.image.data, size, size);
    let path = output::fresh_path(Path::new("example.png"));
    output::write_png(&path, &img, &out.infotexts[0])?;
    println!("wrote {}", path.display());
    Ok(())
}
