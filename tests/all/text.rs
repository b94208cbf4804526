//! Tokens and A1111 prompt parsing against transformers' CLIPTokenizer and A1111's code.

use crate::common::fixture;
use sdw::text::{ClipTokenizer, parse_prompt_attention, weighted_chunks};

fn json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name)).unwrap()).unwrap()
}

#[test]
fn tokenizer_matches_transformers() {
    let tok = ClipTokenizer::new().unwrap();
    let mut bad = Vec::new();
    for case in json("tokenizer_cases.json").as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let got = tok.encode(text);
        if got != want {
            bad.push(format!("{text:?}\n  got  {got:?}\n  want {want:?}"));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn emphasis_and_chunks_match_a1111() {
    let tok = ClipTokenizer::new().unwrap();
    for case in json("prompt_cases.json").as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let parsed = parse_prompt_attention(prompt);
        let want = case["parsed"].as_array().unwrap();
        assert_eq!(parsed.len(), want.len(), "{prompt}: {parsed:?}");
        for ((text, w), exp) in parsed.iter().zip(want) {
            assert_eq!(text, exp[0].as_str().unwrap(), "{prompt}");
            let ew = exp[1].as_f64().unwrap();
            assert!((w - ew).abs() <= 1e-6 * ew.abs().max(1.0), "{prompt}: weight {w} vs {ew}");
        }
        let chunks = weighted_chunks(&tok, prompt);
        let want = case["chunks"].as_array().unwrap();
        assert_eq!(chunks.len(), want.len(), "{prompt}: chunk count");
        for (c, w) in chunks.iter().zip(want) {
            let ids: Vec<u32> = w["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            assert_eq!(c.ids, ids, "{prompt}: ids");
            for (a, b) in c.weights.iter().zip(w["weights"].as_array().unwrap()) {
                let b = b.as_f64().unwrap();
                assert!((*a as f64 - b).abs() <= 1e-6 * b.abs().max(1.0), "{prompt}: weights");
            }
        }
    }
}
