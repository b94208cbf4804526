//! The three networks of Stable Diffusion 1.x, written against burn's device-generic tensors.
//!
//! Each module is built straight from checkpoint tensors (no random init) by a [`Loader`];
//! the architecture is read off the tensor shapes, with SD 1.x conventions where shapes
//! cannot tell (8 UNet heads, 64-wide CLIP heads, 32 GroupNorm groups).

pub mod adapter;
pub mod attention;
pub mod attention_grad;
pub mod attention_tuned;
pub mod budget;
pub mod clip;
pub mod conv;
pub mod graph;
pub mod layers;
pub mod unet;
pub mod vae;

pub use layers::Loader;
