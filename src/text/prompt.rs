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
}

/// Builds chunks as A1111 does; `last_comma` is the position of the last comma in `ids`.
#[derive(Default)]
struct Chunker {
    chunks: Vec<Chunk>,
    ids: Vec<u32>,
    weights: Vec<f32>,
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
        self.chunks.push(Chunk { ids, weights });
        self.last_comma = None;
    }

    fn push(&mut self, id: u32, weight: f32) {
        if id == COMMA {
            self.last_comma = Some(self.ids.len());
        } else if let Some(comma) = self.last_comma.filter(|&c| self.ids.len() == CHUNK_TOKENS && CHUNK_TOKENS - c <= COMMA_BACKTRACK) {
            // A full chunk: move the words after its last comma on to the next chunk.
            let moved_ids = self.ids.split_off(comma + 1);
            let moved_weights = self.weights.split_off(comma + 1);
            self.close();
            self.ids = moved_ids;
            self.weights = moved_weights;
        }
        if self.ids.len() == CHUNK_TOKENS {
            self.close();
        }
        self.ids.push(id);
        self.weights.push(weight);
    }
}

/// The prompt as 77-token CLIP chunks with per-token emphasis weights.
pub fn weighted_chunks(tok: &ClipTokenizer, prompt: &str) -> Vec<Chunk> {
    let mut c = Chunker::default();
    for (text, weight) in parse_prompt_attention(prompt) {
        if text == "BREAK" && weight == -1.0 {
            c.close();
            continue;
        }
        for id in tok.encode(&text) {
            c.push(id, weight as f32);
        }
    }
    if !c.ids.is_empty() || c.chunks.is_empty() {
        c.close();
    }
    c.chunks
}
