//! Loading a checkpoint and turning prompts into images.
//!
//! - [`StableDiffusion`] (`stable_diffusion.rs`): the loaded model; [`loras`] patches its
//!   weights, `conditioning` turns prompts into CLIP states.
//! - [`GenerationParams`] (`params.rs`): what a generation is asked to do; [`infotext`]
//!   writes it as A1111's PNG text and reads it back.
//! - The generations, each returning [`Generated`]: `txt2img.rs` (with hires fix),
//!   `img2img.rs` (with inpainting and "only masked"), over the shared core in
//!   `generate.rs` (conditioning schedules, noise, one sampling pass) and `denoiser.rs`
//!   (the CFG UNet as the samplers see it).
//! - [`image_input`]: user images and masks in (resize modes, blur); [`noise`]: seeds.

pub mod conditioning;
pub mod denoiser;
mod error;
mod generate;
mod generated;
pub mod image_input;
pub mod img2img;
pub mod infotext;
pub mod loras;
pub mod noise;
pub mod params;
mod stable_diffusion;
pub mod txt2img;

pub use error::PipelineError;
pub use generated::{Composite, Generated};
pub use image_input::ResizeMode;
pub use img2img::{InitImage, InpaintingFill, Mask};
pub use infotext::Infotext;
pub use loras::WeightPatches;
pub use noise::Variation;
pub use params::{GenerationParams, HiresFix};
pub use stable_diffusion::StableDiffusion;
