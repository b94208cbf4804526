//! TEMPORARY stub until the real text module lands.
pub struct ClipTokenizer(tokenizers::Tokenizer);
#[derive(Debug)]
pub struct TextError(String);
impl std::fmt::Display for TextError { fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result { f.write_str(&self.0) } }
impl ClipTokenizer {
    pub fn new() -> Result<Self, TextError> {
        Ok(Self(tokenizers::Tokenizer::from_bytes(include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/clip-tokenizer.json"))).map_err(|e| TextError(e.to_string()))?))
    }
    pub fn encode(&self, t: &str) -> Vec<u32> { self.0.encode(t, false).unwrap().get_ids().to_vec() }
}
pub struct Chunk { pub ids: Vec<u32>, pub weights: Vec<f32> }
pub fn weighted_chunks(tok: &ClipTokenizer, p: &str) -> Vec<Chunk> {
    let mut ids = vec![49406]; ids.extend(tok.encode(p)); ids.truncate(76); while ids.len() < 77 { ids.push(49407); }
    vec![Chunk { ids, weights: vec![1.0; 77] }]
}
