//! The AUTOMATIC1111 infotext: the PNG `parameters` text that A1111 and sdw write, read
//! back by `--from-png`, PNG Info and the API.
//!
//! ```text
//! <prompt, maybe over several lines>
//! Negative prompt: <negative prompt, maybe over several lines>
//! Steps: 20, Sampler: DPM++ 2M, Size: 512x768, Lora hashes: "a: 0123456789ab, b: ba9876543210"
//! ```
//!
//! - [`syntax`]: reading and writing the text exactly as A1111 does.
//! - [`settings`]: an infotext from [`GenerationParams`](super::GenerationParams) and back.

mod settings;
mod syntax;

pub use settings::ModelFields;
pub use syntax::quote;

/// An infotext split into its prompts and its `Key: value` parameters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Infotext {
    pub prompt: String,
    pub negative_prompt: String,
    /// The parameters in the order written, unquoted. A key may repeat; the last one wins,
    /// as in A1111's dict.
    pub params: Vec<(String, String)>,
}

impl Infotext {
    /// Sets `key` to `value` where it is, or adds it at the end.
    pub fn set(&mut self, key: &str, value: impl Into<String>) {
        let value = value.into();
        match self.params.iter_mut().rev().find(|(k, _)| k == key) {
            Some(p) => p.1 = value,
            None => self.params.push((key.to_owned(), value)),
        }
    }
}
