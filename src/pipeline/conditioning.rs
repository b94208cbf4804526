//! Prompt -> UNet conditioning, the AUTOMATIC1111 way: emphasis weights scale the
//! CLIP hidden states, which are then rescaled to their original mean, per 77-token
//! chunk; chunks are concatenated along the sequence. Textual-inversion vectors replace
//! the token embeddings of their placeholders before CLIP runs.

use burn::tensor::Tensor;

use crate::embeddings::EmbeddingDb;
use crate::model::clip::ClipTextModel;
use crate::text::{Chunk, ClipTokenizer, weighted_chunks_with};

use crate::model::layers::to_device;

/// Encodes `prompt` to `[1, 77 * chunks, hidden]`.
pub fn encode_prompt(
    tok: &ClipTokenizer,
    clip: &ClipTextModel,
    embeddings: &EmbeddingDb,
    prompt: &str,
    clip_skip: usize,
    device: &burn::tensor::Device,
) -> Tensor<3> {
    PromptTokens::new(tok, clip, embeddings, prompt, device).encode(clip, clip_skip)
}

/// A prompt as CLIP reads it, on the device: each chunk's token embeddings, with
/// textual-inversion vectors spliced in (`[chunks, 77, hidden]`), and each token's emphasis
/// (`[chunks, 77, 1]`). [`Self::encode`] uploads nothing, so a training step that trains the
/// text encoder encodes its prompts inside its recording (`train::recorded`).
#[derive(Clone, Debug)]
pub struct PromptTokens {
    embeds: Tensor<3>,
    weights: Tensor<3>,
}

impl PromptTokens {
    pub fn new(
        tok: &ClipTokenizer,
        clip: &ClipTextModel,
        embeddings: &EmbeddingDb,
        prompt: &str,
        device: &burn::tensor::Device,
    ) -> Self {
        let chunks = weighted_chunks_with(tok, prompt, embeddings);
        let ids: Vec<Vec<u32>> = chunks.iter().map(|c| c.ids.clone()).collect();
        let (k, s, d) = (ids.len(), ids[0].len(), clip.hidden_size());
        let mut embeds = clip.embed_tokens(&ids);
        splice_embeddings(&chunks, embeddings, &mut embeds, d);
        let weights: Vec<f32> = chunks.iter().flat_map(|c| c.weights.iter().copied()).collect();
        Self { embeds: to_device(embeds, [k, s, d], device), weights: to_device(weights, [k, s, 1], device) }
    }

    /// The conditioning: CLIP's hidden states scaled by each token's emphasis, then rescaled to
    /// each chunk's mean before, the chunks one after another: `[1, 77 * chunks, hidden]`.
    pub fn encode(&self, clip: &ClipTextModel, clip_skip: usize) -> Tensor<3> {
        let z = clip.forward_embeds(self.embeds.clone(), clip_skip); // [k, 77, D]
        let [k, s, d] = z.dims();
        let mean_before = z.clone().mean_dim(2).mean_dim(1); // [k, 1, 1]
        let weighted = z * self.weights.clone();
        let mean_after = weighted.clone().mean_dim(2).mean_dim(1);
        let z = weighted * (mean_before / mean_after);
        z.reshape([1, k * s, d])
    }
}

/// Writes each chunk's embedding vectors over the token embeddings (`[chunks, seq, hidden]`)
/// from the position after the fix's offset on, cut at the chunk's end, as A1111's
/// `EmbeddingsWithFixes` does.
pub fn splice_embeddings(chunks: &[Chunk], db: &EmbeddingDb, embeds: &mut [f32], hidden: usize) {
    let mut base = 0;
    for chunk in chunks {
        let seq = chunk.ids.len();
        for fix in &chunk.fixes {
            let Some(e) = db.get(fix.embedding) else { continue };
            let start = fix.offset + 1;
            let n = e.count().min(seq.saturating_sub(start));
            let dst = &mut embeds[(base + start) * hidden..(base + start + n) * hidden];
            dst.copy_from_slice(&e.vectors.data[..n * hidden]);
        }
        base += seq;
    }
}
