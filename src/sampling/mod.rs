//! Noise, schedules and samplers, on host `f32` latents.
//!
//! - [`rng`]: torch's CUDA `randn` (Philox 4x32-10), so seeds match A1111.
//! - [`schedule`]: the SD 1.x DDPM schedule and its sigma schedules
//!   (uniform/"Automatic", Karras, exponential), k-diffusion's
//!   `CompVisDenoiser` maps between sigma and timestep.
//! - [`samplers`]: k-diffusion's samplers over a [`Denoiser`], diffusers' DDIM
//!   over an [`EpsModel`], the registry of CLI/A1111 names, and [`sample`],
//!   which runs a [`Sampler`] from initial noise to the final latent.
//!
//! The UNet runs elsewhere (any device); it enters here as an [`EpsModel`]
//! (`eps(x, t)`), wrapped as k-diffusion does by [`CompVisDenoiser`].

pub mod rng;
pub mod samplers;
pub mod schedule;

pub use rng::Philox;
pub use samplers::{
    CompVisDenoiser, Denoiser, EpsModel, KSamplerFn, NoProgress, NoiseSource, Progress, SAMPLER_NAMES, SampleCtx,
    Sampler, SamplerKind, ScheduleKind, Start, ddim, ddim_timesteps, dpm2, dpmpp_2m, dpmpp_2s_ancestral, euler,
    euler_ancestral, get_ancestral_step, heun, img2img_steps, linear_multistep_coeff, lms, parse_sampler, sample,
    schedule_sigmas, sigmas_for,
};
pub use schedule::Schedule;
