//! The `sdw` command line.

mod bench;
mod doctor;
mod generate;
mod progress;
mod serve;

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::device::{self, Compute, DeviceChoice, Precision};
use crate::{embeddings, lora, output, sampling};

#[derive(Parser, Debug)]
#[command(name = "sdw", version, about = "Stable Diffusion 1.x on any GPU (wgpu) or the CPU")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Threads the CPU backend computes on (default: one per core).
    #[arg(long, global = true, value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
    /// Use the WGSL shaders in DIR instead of the built-in ones of the same name (also
    /// `SDW_SHADER_DIR`); `sdw shaders dump DIR` writes the built-in ones to start from.
    #[arg(long, global = true)]
    shader_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate images from a text prompt.
    Txt2img(Box<generate::GenerateArgs>),
    /// Restyle an image (img2img), or repaint the white part of a --mask (inpainting).
    Img2img(Box<generate::Img2ImgArgs>),
    /// Fine-tune a LoRA on photos of a subject (DreamBooth-LoRA).
    Train(Box<crate::train::TrainOptions>),
    /// List the samplers with their AUTOMATIC1111 names.
    Samplers,
    /// List the checkpoints in the models folder (name, format, size, A1111 hash) and the
    /// models in the Hugging Face cache.
    Models {
        #[arg(long, default_value = "models")]
        models_dir: PathBuf,
    },
    /// List the LoRA files in a folder: rank, alpha, target model, A1111 hash.
    Loras {
        #[arg(long, default_value = "models/Lora")]
        lora_dir: PathBuf,
    },
    /// List the textual-inversion embeddings in a folder: vectors, width, target model, A1111 hash.
    Embeddings {
        #[arg(long, default_value = generate::EMBEDDINGS_DIR)]
        embeddings_dir: PathBuf,
    },
    /// Print the generation parameters stored in an image (sdw's or A1111's).
    PngInfo { image: PathBuf },
    /// Check that this GPU computes what the CPU computes: adapter details, then every op
    /// family sdw uses and a tiny random-weight model, against the CPU backend.
    Doctor(doctor::DoctorArgs),
    /// Time CLIP, a UNet step, the VAE and a whole txt2img, cold and warm, with peak memory
    /// (random SD 1.5 weights unless --model is given).
    Bench(bench::BenchArgs),
    /// The AUTOMATIC1111 web UI and API (/sdapi/v1) on http://127.0.0.1:7860.
    Serve(Box<serve::ServeArgs>),
    /// sdw's own WGSL shaders.
    Shaders {
        #[command(subcommand)]
        action: ShadersAction,
    },
}

/// Where and in what the networks compute: the options txt2img, img2img, serve and bench share.
#[derive(clap::Args, Debug)]
struct ComputeArgs {
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
    /// What the networks compute in: `auto` is f16 on a GPU with f16 shaders (the VAE too,
    /// redone in f32 where it overflows). Training (`sdw train`, the web UI's, `bench --train`)
    /// keeps its frozen weights in it and computes in f32.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    precision: Precision,
    /// Keep the VAE in f32 under f16 (A1111's `--no-half-vae`): for a VAE that overflows in f16,
    /// which would otherwise decode twice before sdw switches it.
    #[arg(long)]
    no_half_vae: bool,
}

impl ComputeArgs {
    /// The device these options pick, set up as they ask.
    fn select(&self) -> anyhow::Result<Compute> {
        Ok(device::select(self.device)?.with_precision(self.precision)?.with_vae_in_f32(self.no_half_vae))
    }
}

#[derive(Subcommand, Debug)]
enum ShadersAction {
    /// Write the built-in shaders into DIR (files already there are kept), to edit and
    /// load with --shader-dir DIR.
    Dump { dir: PathBuf },
}

pub fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        crate::device::set_cpu_threads(n.into()).map_err(anyhow::Error::msg)?;
    }
    crate::shaders::set_shader_dir(cli.shader_dir);
    match cli.command {
        Command::Doctor(args) => doctor::run(args),
        Command::Shaders { action: ShadersAction::Dump { dir } } => dump_shaders(&dir),
        Command::Bench(args) => bench::run(args),
        Command::Serve(args) => serve::run(*args),
        Command::Txt2img(args) => generate::txt2img(*args),
        Command::Img2img(args) => generate::img2img(*args),
        Command::Samplers => {
            for (cli, a1111) in sampling::sampler_names() {
                println!("{cli:<18} {a1111}");
            }
            Ok(())
        }
        Command::Loras { lora_dir } => list_loras(&lora_dir),
        Command::Embeddings { embeddings_dir } => list_embeddings(&embeddings_dir),
        Command::PngInfo { image } => png_info(&image),
        Command::Models { models_dir } => list_models(&models_dir),
        Command::Train(opts) => {
            set_oom_remedy("Try --resolution 384, --batch-size 1, or --device cpu.");
            let path = crate::train::train(*opts)?;
            println!("{}", path.display());
            Ok(())
        }
    }
}

static OOM_REMEDY: std::sync::Mutex<&'static str> =
    std::sync::Mutex::new("Try a smaller --width/--height, or --device cpu.");

/// What to suggest when the GPU runs out of memory (the command knows best).
fn set_oom_remedy(remedy: &'static str) {
    *OOM_REMEDY.lock().unwrap_or_else(|e| e.into_inner()) = remedy;
}

/// The remedy the running command suggests for a GPU out-of-memory panic.
pub fn oom_remedy() -> &'static str {
    *OOM_REMEDY.lock().unwrap_or_else(|e| e.into_inner())
}

fn dump_shaders(dir: &Path) -> anyhow::Result<()> {
    let (written, kept) = crate::shaders::dump(dir).with_context(|| format!("writing into {}", dir.display()))?;
    for p in written {
        println!("{}", p.display());
    }
    for p in kept {
        eprintln!("kept {} (already there; delete it to get the built-in one)", p.display());
    }
    Ok(())
}

fn list_models(dir: &Path) -> anyhow::Result<()> {
    let models = crate::models_dir::ModelsDir::new(dir);
    let local = models.checkpoints();
    println!("{} ({} checkpoints)", models.root.join(crate::models_dir::CHECKPOINTS).display(), local.len());
    println!("  {:<48} {:<11} {:>10} hash", "name", "format", "size");
    for e in &local {
        let format = match e.path.extension().and_then(|x| x.to_str()) {
            _ if e.path.is_dir() => "diffusers",
            Some(ext) => ext,
            None => "?",
        };
        // A1111's short hash: the file's sha256 (cached, so a 4 GB file is read once).
        let hash = match e.path.is_file().then(|| output::model_hash(&e.path)) {
            Some(Ok(h)) => h[..10].to_string(),
            _ => "-".into(),
        };
        println!("  {:<48} {format:<11} {:>10} {hash}", e.name, crate::hub::human_bytes(disk_size(&e.path)));
    }
    let hub = crate::hub::Hub::from_env()?;
    let cached = hub.cached_models();
    println!("{} ({} Hub models)", hub.cache_dir().display(), cached.len());
    for (repo, file, path) in cached {
        let name = if file.is_empty() { repo } else { format!("{repo}/{file}") };
        println!("  {name:<60} {:>10}", crate::hub::human_bytes(disk_size(&path)));
    }
    Ok(())
}

/// A file's size, or the bytes under a folder (links followed: the Hub cache's snapshots
/// are links into its blobs).
fn disk_size(path: &Path) -> u64 {
    if !path.is_dir() {
        return std::fs::metadata(path).map_or(0, |m| m.len());
    }
    std::fs::read_dir(path).map_or(0, |r| r.flatten().map(|e| disk_size(&e.path())).sum())
}

fn png_info(path: &Path) -> anyhow::Result<()> {
    match output::read_parameters(path).with_context(|| format!("reading {}", path.display()))? {
        Some(text) => {
            println!("{text}");
            Ok(())
        }
        None => anyhow::bail!("{}: no generation parameters in this image", path.display()),
    }
}

fn list_loras(dir: &Path) -> anyhow::Result<()> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    paths.sort();
    println!("{:<32} {:>5} {:>6} {:>8} {:<8} hash", "name", "rank", "alpha", "modules", "target");
    for p in paths {
        match lora::LoraInfo::inspect(&p) {
            Ok(i) => println!(
                "{:<32} {:>5} {:>6} {:>8} {:<8} {}",
                i.name,
                i.rank.map_or("-".into(), |r| r.to_string()),
                i.alpha.map_or("-".into(), output::fmt_num),
                i.modules,
                i.target,
                lora::addnet_hash(&p)?
            ),
            Err(_) => continue, // not a LoRA (e.g. a checkpoint in the same folder)
        }
    }
    Ok(())
}

fn list_embeddings(dir: &Path) -> anyhow::Result<()> {
    println!("{:<32} {:>7} {:>6} {:<8} hash", "name", "vectors", "width", "target");
    for (path, loaded) in embeddings::scan_dir(dir)? {
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        match loaded.and_then(|e| Ok((e.shorthash()?, e))) {
            Ok((hash, e)) => println!("{:<32} {:>7} {:>6} {:<8} {hash}", e.name, e.count(), e.width, e.target),
            // Listed rather than fatal: one bad file should not hide the others.
            Err(err) => println!("{name:<32} error: {err}"),
        }
    }
    Ok(())
}
