//! Noise, schedules and samplers, on host `f32` latents.
//!
//! - [`rng`]: torch's CUDA `randn` (Philox 4x32-10), so seeds match A1111.
//! - [`schedule`]: the SD 1.x DDPM schedule and its sigma schedules
//!   (uniform/"Automatic", Karras, exponential), k-diffusion's
//!   `CompVisDenoiser` maps between sigma and timestep.
//! - [`denoiser`]: what samplers run against: the model as an [`EpsModel`], seen as
//!   a [`Denoiser`] through [`CompVisDenoiser`], and a sampler's per-step noise and
//!   progress ([`SampleCtx`]).
//! - [`k_diffusion`]: k-diffusion's samplers (Euler, Euler a, Heun, DPM2, LMS,
//!   DPM++ 2M, DPM++ 2S a) over a [`Denoiser`].
//! - [`ddim`]: diffusers' DDIM over an [`EpsModel`].
//! - [`registry`]: [`SAMPLERS`], the one table of every sampler's CLI/A1111 names
//!   and function, and [`Sampler`] (a sampler with its schedule) with its parsing.
//! - [`run`]: [`sample`], which runs a [`Sampler`] from initial noise
//!   to the final latent, and [`sigmas_for`].
//!
//! The UNet runs elsewhere (any device); it enters here as an [`EpsModel`]
//! (`eps(x, t)`), wrapped as k-diffusion does by [`CompVisDenoiser`].

pub mod ddim;
pub mod denoiser;
pub mod k_diffusion;
pub mod registry;
pub mod rng;
pub mod run;
pub mod schedule;

pub use ddim::ddim_timesteps;
pub use denoiser::{CompVisDenoiser, Denoiser, EpsModel, NoProgress, NoiseSource, Progress, SampleCtx};
pub use k_diffusion::{
    KSamplerFn, dpm2, dpmpp_2m, dpmpp_2s_ancestral, euler, euler_ancestral, get_ancestral_step, heun,
    linear_multistep_coeff, lms,
};
pub use registry::{
    SAMPLERS, Sampler, SamplerEntry, SamplerFn, SamplerKind, ScheduleKind, parse_sampler, sampler_names,
};
pub use rng::Philox;
pub use run::{DenoisedHook, Start, img2img_steps, sample, schedule_sigmas, sigmas_for};
pub use schedule::Schedule;
