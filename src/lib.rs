//! sdw: Stable Diffusion 1.x on any GPU through wgpu, or on the CPU.
//!
//! Layers, bottom up: [`weights`] reads checkpoints, [`model`] holds the networks,
//! [`text`] turns prompts into tokens, [`sampling`] holds the noise schedules and
//! samplers, [`pipeline`] ties them into txt2img, [`output`] saves A1111-style PNGs.

pub mod bench;
pub mod cli;
pub mod cpu;
pub mod device;
pub mod doctor;
pub mod embeddings;
pub mod hub;
pub mod lora;
pub mod model;
pub mod models_dir;
pub mod output;
pub mod pipeline;
pub mod sampling;
pub mod server;
pub mod shaders;
pub mod text;
pub mod train;
pub mod weights;
