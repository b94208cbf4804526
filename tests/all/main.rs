//! Every integration test in one crate: each test crate links burn and wgpu again, so one
//! binary keeps CI builds short. Modules are named for what they check.

mod bench;
mod binding_limit;
mod ckpt;
mod common;
mod doctor;
mod embeddings;
mod generation;
mod graph;
mod hub;
mod img2img;
mod lora;
mod model_parity;
mod sampling;
mod sd15_keys;
mod server;
mod shaders;
mod text;
mod train;
mod train_e2e;
mod txt2img;
