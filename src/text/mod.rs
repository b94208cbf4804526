//! Prompt text to CLIP tokens: the tokenizer and AUTOMATIC1111's prompt syntax.

pub mod prompt;
pub mod tokenizer;

pub use prompt::{Chunk, parse_prompt_attention, weighted_chunks};
pub use tokenizer::ClipTokenizer;

#[derive(Debug, thiserror::Error)]
#[error("CLIP tokenizer: {0}")]
pub struct TextError(pub String);
