//! Why a pipeline call failed: the weights, a LoRA, an embedding, the tokenizer, or the
//! request itself (bad settings: the message says which and why).

use crate::embeddings::EmbeddingError;
use crate::lora::LoraError;
use crate::weights::WeightsError;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Lora(#[from] LoraError),
    #[error(transparent)]
    Embedding(#[from] EmbeddingError),
    #[error("tokenizer: {0}")]
    Text(String),
    #[error("{0}")]
    Invalid(String),
}
