//! AUTOMATIC1111's prompt syntax: emphasis `(x)` x1.1, `[x]` /1.1, `(x:w)`, `\(` escapes,
//! `BREAK`, and the 75-token chunking of long prompts (`sd_hijack_clip.tokenize_line`).

use super::tokenizer::{BOS, COMMA, ClipTokenizer, EOS};

/// Tokens per chunk between BOS and EOS.
pub const CHUNK_TOKENS: usize = 75;
/// A full chunk is cut after a comma found within its last this-many tokens.
const COMMA_BACKTRACK: usize = 20;

/// One piece of the scanned prompt.
enum Tok<'a> {
    Escaped(&'a str),
    Open(char),
    /// `:1.3)` with its source text (plain text when no `(` is open).
    WeightClose(f64, &'a str),
    Close(char),
    Text(&'a str),
}

/// Splits like A1111's `re_attention`: escapes, brackets, `:w)`, text runs, stray `:`.
fn scan(text: &str) -> Vec<Tok<'_>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < text.len() {
        let rest = &text[i..];
        let c = rest.chars().next().unwrap();
        if c == '\\' {
            let next = rest[1..].chars().next();
            match next {
                Some(n @ ('(' | ')' | '[' | ']' | '\\')) => {
                    out.push(Tok::Escaped(&rest[..1 + n.len_utf8()]));
                    i += 1 + n.len_utf8();
                }
                _ => {
                    out.push(Tok::Escaped("\\"));
                    i += 1;
                }
            }
        } else if c == '(' || c == '[' {
            out.push(Tok::Open(c));
            i += 1;
        } else if c == ')' || c == ']' {
            out.push(Tok::Close(c));
            i += 1;
        } else if c == ':' {
            match weight_close(rest) {
                Some((w, len)) => {
                    out.push(Tok::WeightClose(w, &rest[..len]));
                    i += len;
                }
                None => {
                    out.push(Tok::Text(":"));
                    i += 1;
                }
            }
        } else {
            let end = rest.find(['\\', '(', ')', '[', ']', ':']).unwrap_or(rest.len());
            out.push(Tok::Text(&rest[..end]));
            i += end;
        }
    }
    out
}

/// Matches `:\s*([+-]?[.\d]+)\s*\)` at the start of `s`: (weight, bytes consumed).
fn weight_close(s: &str) -> Option<(f64, usize)> {
    let after_colon = &s[1..];
    let t = after_colon.trim_start();
    let mut n = 0;
    let tb = t.as_bytes();
    if n < tb.len() && (tb[n] == b'+' || tb[n] == b'-') {
        n += 1;
    }
    let digits_start = n;
    while n < tb.len() && (tb[n] == b'.' || tb[n].is_ascii_digit()) {
        n += 1;
    }
    if n == digits_start {
        return None;
    }
    let number = &t[..n];
    let tail = t[n..].trim_start();
    if !tail.starts_with(')') {
        return None;
    }
    let weight = number.parse::<f64>().ok()?;
    Some((weight, s.len() - tail.len() + 1))
}

/// Splits on `\s*\bBREAK\b\s*` (Python `re.split` semantics).
fn split_break(text: &str) -> Vec<&str> {
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let mut parts = Vec::new();
    let mut start = 0;
    let mut search = 0;
    while let Some(pos) = text[search..].find("BREAK").map(|p| p + search) {
        let end = pos + "BREAK".len();
        let before_ok = text[..pos].chars().next_back().is_none_or(|c| !is_word(c));
        let after_ok = text[end..].chars().next().is_none_or(|c| !is_word(c));
        if before_ok && after_ok {
            let cut_start = text[..pos].trim_end().len().max(start);
            let cut_end = end + (text[end..].len() - text[end..].trim_start().len());
            parts.push(&text[start..cut_start]);
            start = cut_end;
            search = cut_end;
        } else {
            search = end;
        }
    }
    parts.push(&text[start..]);
    parts
}

/// Appends literal text, splitting it at `BREAK`s.
fn push_text(res: &mut Vec<(String, f64)>, text: &str) {
    for (i, part) in split_break(text).into_iter().enumerate() {
        if i > 0 {
            res.push(("BREAK".into(), -1.0));
        }
        res.push((part.to_owned(), 1.0));
    }
}

/// Emphasis runs of `text` with their weights; `("BREAK", -1.0)` marks a BREAK.
pub fn parse_prompt_attention(text: &str) -> Vec<(String, f64)> {
    let mut res: Vec<(String, f64)> = Vec::new();
    let (mut round, mut square): (Vec<usize>, Vec<usize>) = (Vec::new(), Vec::new());
    let multiply = |res: &mut Vec<(String, f64)>, start: usize, m: f64| {
        for r in &mut res[start..] {
            r.1 *= m;
        }
    };
    for tok in scan(text) {
        match tok {
            Tok::Escaped(t) => res.push((t[1..].to_owned(), 1.0)),
            Tok::Open('(') => round.push(res.len()),
            Tok::Open(_) => square.push(res.len()),
            Tok::WeightClose(w, _) if !round.is_empty() => {
                let start = round.pop().unwrap();
                multiply(&mut res, start, w);
            }
            Tok::Close(')') if !round.is_empty() => {
                let start = round.pop().unwrap();
                multiply(&mut res, start, 1.1);
            }
            Tok::Close(']') if !square.is_empty() => {
                let start = square.pop().unwrap();
                multiply(&mut res, start, 1.0 / 1.1);
            }
            // Text, and a `:w)` or bracket with nothing open to close, stay literal.
            Tok::Text(t) | Tok::WeightClose(_, t) => push_text(&mut res, t),
            Tok::Close(c) => push_text(&mut res, &c.to_string()),
        }
    }
    for start in round {
        multiply(&mut res, start, 1.1);
    }
    for start in square {
        multiply(&mut res, start, 1.0 / 1.1);
    }
    if res.is_empty() {
        res.push((String::new(), 1.0));
    }
    let mut i = 0;
    while i + 1 < res.len() {
        if res[i].1 == res[i + 1].1 {
            let next = res.remove(i + 1);
            res[i].0.push_str(&next.0);
        } else {
            i += 1;
        }
    }
    res
}

/// One CLIP input: BOS + 75 tokens (EOS-padded) + EOS, with a weight per position.
#[derive(Clone, Debug, PartialEq)]
pub struct Chunk {
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
    /// Textual-inversion vectors to splice into the CLIP input after the token lookup.
    pub fixes: Vec<Fix>,
}

/// An embedding's place in a chunk (A1111's `PromptChunkFix`): its vectors replace the
/// token embeddings from `ids[offset + 1]` on (`offset` counts from after BOS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fix {
    pub offset: usize,
    pub embedding: usize,
}

/// A textual-inversion embedding whose name starts a run of tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmbeddingMatch {
    /// The caller's index for the embedding (it comes back in [`Fix::embedding`]).
    pub embedding: usize,
    /// How many prompt tokens the name takes.
    pub name_tokens: usize,
    /// How many positions its vectors take (at most [`CHUNK_TOKENS`]).
    pub vectors: usize,
}

/// Finds embeddings by name in tokenized prompt text (A1111's `find_embedding_at_position`).
pub trait EmbeddingLookup {
    /// The embedding whose name's tokens begin `tokens`, longest name first.
    fn find_at(&self, tokens: &[u32]) -> Option<EmbeddingMatch>;
}

/// A prompt without textual inversion.
pub struct NoEmbeddings;

impl EmbeddingLookup for NoEmbeddings {
    fn find_at(&self, _: &[u32]) -> Option<EmbeddingMatch> {
        None
    }
}

/// The token id A1111 puts where embedding vectors go (`!`); its embedding is replaced.
const PLACEHOLDER: u32 = 0;

/// Builds chunks as A1111 does; `last_comma` is the position of the last comma in `ids`.
#[derive(Default)]
struct Chunker {
    chunks: Vec<Chunk>,
    ids: Vec<u32>,
    weights: Vec<f32>,
    fixes: Vec<Fix>,
    last_comma: Option<usize>,
}

impl Chunker {
    fn close(&mut self) {
        let pad = CHUNK_TOKENS - self.ids.len();
        let mut ids = vec![BOS];
        ids.append(&mut self.ids);
        ids.extend(std::iter::repeat_n(EOS, pad + 1));
        let mut weights = vec![1.0];
        weights.append(&mut self.weights);
        weights.extend(std::iter::repeat_n(1.0, pad + 1));
        self.chunks.push(Chunk { ids, weights, fixes: std::mem::take(&mut self.fixes) });
        self.last_comma = None;
    }

    /// A1111's bookkeeping before the token at hand (`id`, the first of an embedding's
    /// name too): note a comma, or close a full chunk, cut after its last comma if that is
    /// within the last 20 tokens.
    fn make_room(&mut self, id: u32) {
        if id == COMMA {
            self.last_comma = Some(self.ids.len());
        } else if let Some(comma) =
            self.last_comma.filter(|&c| self.ids.len() == CHUNK_TOKENS && CHUNK_TOKENS - c <= COMMA_BACKTRACK)
        {
            // Move the words after the comma on to the next chunk. Like A1111, an embedding's
            // fix stays behind (its vectors land in the padding; placeholders move on), so
            // images match A1111's.
            let moved_ids = self.ids.split_off(comma + 1);
            let moved_weights = self.weights.split_off(comma + 1);
            self.close();
            self.ids = moved_ids;
            self.weights = moved_weights;
        }
        if self.ids.len() == CHUNK_TOKENS {
            self.close();
        }
    }

    fn push_token(&mut self, id: u32, weight: f32) {
        self.ids.push(id);
        self.weights.push(weight);
    }

    /// An embedding is never split: it opens a new chunk if it does not fit this one.
    fn push_embedding(&mut self, m: EmbeddingMatch, weight: f32) {
        // Lookups refuse longer embeddings; the clamp keeps every chunk 77 long regardless.
        let n = m.vectors.min(CHUNK_TOKENS);
        if self.ids.len() + n > CHUNK_TOKENS {
            self.close();
        }
        self.fixes.push(Fix { offset: self.ids.len(), embedding: m.embedding });
        self.ids.extend(std::iter::repeat_n(PLACEHOLDER, n));
        self.weights.extend(std::iter::repeat_n(weight, n));
    }
}

/// The prompt as 77-token CLIP chunks with per-token emphasis weights.
pub fn weighted_chunks(tok: &ClipTokenizer, prompt: &str) -> Vec<Chunk> {
    weighted_chunks_with(tok, prompt, &NoEmbeddings)
}

/// [`weighted_chunks`] with textual-inversion embeddings found by name in each emphasis
/// run (`sd_hijack_clip.tokenize_line`): their vectors take one position each, weighted
/// like the run.
pub fn weighted_chunks_with(tok: &ClipTokenizer, prompt: &str, embeddings: &dyn EmbeddingLookup) -> Vec<Chunk> {
    let mut c = Chunker::default();
    for (text, weight) in parse_prompt_attention(prompt) {
        if text == "BREAK" && weight == -1.0 {
            c.close();
            continue;
        }
        let tokens = tok.encode(&text);
        let mut pos = 0;
        while pos < tokens.len() {
            c.make_room(tokens[pos]);
            match embeddings.find_at(&tokens[pos..]) {
                Some(m) => {
                    c.push_embedding(m, weight as f32);
                    pos += m.name_tokens.max(1);
                }
                None => {
                    c.push_token(tokens[pos], weight as f32);
                    pos += 1;
                }
            }
        }
    }
    if !c.ids.is_empty() || c.chunks.is_empty() {
        c.close();
    }
    c.chunks
}
