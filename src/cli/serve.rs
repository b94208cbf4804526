//! `sdw serve`: the A1111 web UI and API.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;

use crate::models_dir::ModelsDir;
use crate::server::{ServeOptions, TrainDevice, serve};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// A1111's models folder: Stable-diffusion/, Lora/, VAE/, embeddings/.
    #[arg(long, default_value = "models")]
    models_dir: PathBuf,
    /// 0 picks a free port (printed on the first line of stdout).
    #[arg(long, default_value_t = 7860)]
    port: u16,
    /// Listen on every network interface (0.0.0.0), not only this machine (127.0.0.1).
    #[arg(long)]
    listen: bool,
    /// HTTP Basic credentials every route asks for: USER:PASS[,USER2:PASS2].
    #[arg(long, value_name = "USER:PASS[,..]")]
    api_auth: Option<String>,
    /// Origins whose pages may call the API (CORS), comma-separated.
    #[arg(long, value_delimiter = ',')]
    cors_allow_origins: Vec<String>,
    #[command(flatten)]
    compute: super::ComputeArgs,
    /// Where `save_images` (and the web UI) write images: txt2img/, img2img/ below it.
    #[arg(long, default_value = "outputs")]
    outdir: PathBuf,
}

pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    let auth = match &a.api_auth {
        None => Vec::new(),
        Some(list) => parse_auth(list)?,
    };
    if a.listen && auth.is_empty() {
        eprintln!("note: --listen without --api-auth: anyone on the network can use this server");
    }
    let compute = a.compute.select()?;
    let opts = ServeOptions {
        models: ModelsDir::new(&a.models_dir),
        port: a.port,
        listen: a.listen,
        auth,
        cors_origins: a.cors_allow_origins,
        outdir: a.outdir,
        training: TrainDevice { device: a.compute.device, precision: a.compute.precision },
    };
    if opts.models.checkpoints().is_empty() {
        eprintln!(
            "note: no checkpoint in {}; generation answers 404 until one is there",
            a.models_dir.join(crate::models_dir::CHECKPOINTS).display()
        );
    }
    serve(opts, compute)
}

fn parse_auth(list: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for pair in list.split(',') {
        match pair.split_once(':') {
            Some((user, pass)) if !user.is_empty() && !pass.is_empty() => out.push((user.into(), pass.into())),
            _ => bail!("--api-auth takes USER:PASS pairs separated by commas, got {pair:?}"),
        }
    }
    Ok(out)
}
