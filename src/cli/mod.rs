//! The `sdw` command line.

mod generate;
mod progress;

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::{embeddings, lora, output, sampling};

#[derive(Parser, Debug)]
#[command(name = "sdw", version, about = "Stable Diffusion 1.x on any GPU (wgpu) or the CPU")]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
}

pub fn run() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Txt2img(args) => generate::txt2img(*args),
        Command::Img2img(args) => generate::img2img(*args),
        Command::Samplers => {
            for (cli, a1111) in sampling::SAMPLER_NAMES {
                println!("{cli:<18} {a1111}");
            }
            Ok(())
        }
        Command::Loras { lora_dir } => list_loras(&lora_dir),
        Command::Embeddings { embeddings_dir } => list_embeddings(&embeddings_dir),
        Command::PngInfo { image } => png_info(&image),
        Command::Train(opts) => {
            let path = crate::train::train(*opts)?;
            println!("{}", path.display());
            Ok(())
        }
    }
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

