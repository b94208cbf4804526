//! The CLIP BPE tokenizer (openai/clip-vit-large-patch14's vocabulary, embedded), as
//! transformers' `CLIPTokenizer` that SD 1.x was trained with.

use super::TextError;

pub const BOS: u32 = 49406;
pub const EOS: u32 = 49407;
/// `,</w>`: A1111 cuts long prompts after commas.
pub const COMMA: u32 = 267;

static TOKENIZER_JSON: &[u8] = include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/clip-tokenizer.json"));

pub struct ClipTokenizer {
    inner: tokenizers::Tokenizer,
}

impl ClipTokenizer {
    pub fn new() -> Result<Self, TextError> {
        let inner = tokenizers::Tokenizer::from_bytes(TOKENIZER_JSON).map_err(|e| TextError(e.to_string()))?;
        Ok(Self { inner })
    }

    /// Token ids of `text`, without BOS/EOS.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        match self.inner.encode(text, false) {
            Ok(enc) => enc.get_ids().to_vec(),
            // The tokenizer fails only on internal errors; an empty prompt is the safe reading.
            Err(_) => Vec::new(),
        }
    }
}
