//! Prompt -> UNet conditioning, the AUTOMATIC1111 way: emphasis weights scale the
//! CLIP hidden states, which are then rescaled to their original mean, per 77-token
//! chunk; chunks are concatenated along the sequence.

use burn::tensor::Tensor;

use crate::model::clip::ClipTextModel;
use crate::text::{ClipTokenizer, weighted_chunks};

use crate::model::layers::to_device;

/// Encodes `prompt` to `[1, 77 * chunks, hidden]`.
pub fn encode_prompt(tok: &ClipTokenizer, clip: &ClipTextModel, prompt: &str, clip_skip: usize, device: &burn::tensor::Device) -> Tensor<3> {
    let chunks = weighted_chunks(tok, prompt);
    let ids: Vec<Vec<u32>> = chunks.iter().map(|c| c.ids.clone()).collect();
    let z = clip.forward(&ids, clip_skip, device); // [k, 77, D]
    let [k, s, d] = z.dims();
    let weights: Vec<f32> = chunks.iter().flat_map(|c| c.weights.iter().copied()).collect();
    let w = to_device(weights, [k, s, 1], device);
    let mean_before = z.clone().mean_dim(2).mean_dim(1); // [k, 1, 1]
    let weighted = z * w;
    let mean_after = weighted.clone().mean_dim(2).mean_dim(1);
    let z = weighted * (mean_before / mean_after);
    z.reshape([1, k * s, d])
}
