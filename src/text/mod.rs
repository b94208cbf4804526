//! Prompt text to CLIP tokens: the tokenizer and AUTOMATIC1111's prompt syntax.

pub mod prompt;
pub mod schedule;
pub mod tokenizer;

pub use prompt::{
    Chunk, EmbeddingLookup, EmbeddingMatch, Fix, NoEmbeddings, parse_prompt_attention, weighted_chunks,
    weighted_chunks_with,
};
pub use tokenizer::ClipTokenizer;

/// Tokens in CLIP's vocabulary (every SD 1.x text encoder).
pub const VOCAB_SIZE: usize = 49408;

#[derive(Debug, thiserror::Error)]
#[error("CLIP tokenizer: {0}")]
pub struct TextError(pub String);
