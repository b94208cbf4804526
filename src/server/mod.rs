//! `sdw serve`: AUTOMATIC1111's API (`/sdapi/v1`) and a web UI, from one binary.
//!
//! - [`a1111`]: the request/response bodies and their defaults.
//! - [`routes`]: the HTTP routes, auth, CORS and body limits.
//! - [`worker`]: the thread that owns the model and runs one job at a time.
//! - `training.rs`: DreamBooth-LoRA runs started from the web UI.
//! - [`error`]: A1111's error shape.
//! - `ui/`: the page, served from the binary (no CDN: it works offline).

pub mod a1111;
pub mod error;
mod images;
mod routes;
mod training;
pub mod worker;

pub use training::TrainDevice;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use anyhow::Context;

use crate::device::Compute;
use crate::models_dir::ModelsDir;

/// How `sdw serve` was started.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub models: ModelsDir,
    pub port: u16,
    /// Listen on every interface instead of 127.0.0.1 only.
    pub listen: bool,
    /// `user:password` pairs for HTTP Basic auth on every route.
    pub auth: Vec<(String, String)>,
    pub cors_origins: Vec<String>,
    pub outdir: PathBuf,
    /// The device and precision training runs use (those generation uses).
    pub training: training::TrainDevice,
}

/// Serves until Ctrl-C; the running job stops after its current step and its finished
/// images are saved before the process exits.
pub fn serve(opts: ServeOptions, compute: Compute) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting tokio")?;
    runtime.block_on(async move {
        let ip = if opts.listen { [0, 0, 0, 0] } else { [127, 0, 0, 1] };
        let listener = tokio::net::TcpListener::bind(SocketAddr::from((ip, opts.port)))
            .await
            .with_context(|| format!("listening on port {}", opts.port))?;
        let addr = listener.local_addr()?;
        eprintln!("device: {}", compute.summary());
        let app = routes::App::new(opts, compute);
        let shared = app.worker.shared.clone();
        let waiter = app.worker.shared.clone();
        let router = routes::router(app);
        // The first line on stdout is the address (tests and scripts read it).
        println!("sdw serving on http://{addr}");
        let shutdown = async move {
            let _ = tokio::signal::ctrl_c().await;
            eprintln!("stopping: the running job ends after its current step");
            shared.stopping.store(true, Ordering::SeqCst);
            shared.interrupt.store(true, Ordering::SeqCst);
            shared.train_stop.store(true, Ordering::SeqCst);
        };
        axum::serve(listener, router).with_graceful_shutdown(shutdown).await.context("serving")?;
        // No request waits on a training run: wait here until it has saved its checkpoint
        // (every request has been answered; nothing else runs on this runtime now).
        while waiter.busy() {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Ok(())
    })
}
