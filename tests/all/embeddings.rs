//! Textual-inversion embeddings: the `tinyti` vectors spliced into the CLIP input against
//! transformers (`ti.last_hidden_state`), the `.pt` layout, emphasis, infotext, listing and
//! the refusals.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;
use sdw::pipeline::{GenerationParams, StableDiffusion};
use sdw::sampling::Sampler;
use sdw::text::weighted_chunks_with;

/// A fresh folder holding the given fixture files.
fn embeddings_dir(what: &str, files: &[&str]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdw-ti-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in files {
        let src = fixture(f);
        std::fs::copy(&src, dir.join(src.file_name().unwrap())).unwrap();
    }
    dir
}

fn load(c: sdw::device::Compute, dir: &Path) -> StableDiffusion {
    let mut sd = StableDiffusion::load(&fixture("tiny-sd-fp16.safetensors"), c).unwrap();
    sd.load_embeddings(dir).unwrap();
    sd
}

fn params(prompt: &str, negative: &str) -> GenerationParams {
    GenerationParams {
        prompt: prompt.into(),
        negative_prompt: negative.into(),
        sampler: Sampler::parse("euler_a").unwrap(),
        steps: 2,
        cfg_scale: 7.0,
        seed: 1,
        width: 64,
        height: 64,
        clip_skip: 1,
        lora_hashes: Vec::new(),
        ..Default::default()
    }
}

#[test]
fn embedding_vectors_replace_the_name_in_the_clip_input() {
    let cases = cases();
    let case = &cases["cases"]["ti"];
    let prompt = case["prompt"].as_str().unwrap();
    let slots: Vec<usize> = case["slots"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let want_ids: Vec<u32> =
        case["ids_with_slots"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let dir = embeddings_dir("golden", &["tinyti.safetensors"]);
    for c in devices() {
        let sd = load(c.clone(), &dir);
        assert_eq!(sd.embeddings.usable(), 1);
        // The name takes the embedding's two positions; every other id is the reference's.
        let chunks = weighted_chunks_with(&sd.tokenizer, prompt, &sd.embeddings);
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].fixes.len(), 1);
        assert_eq!(chunks[0].fixes[0].offset + 1, slots[0]);
        for (i, (&got, &want)) in chunks[0].ids.iter().zip(&want_ids).enumerate() {
            if !slots.contains(&i) {
                assert_eq!(got, want, "id {i}");
            }
        }
        let got = sdw::model::layers::to_host(sd.encode_prompt(prompt, 1));
        let mut want = golden("ti.last_hidden_state");
        want.shape = got.shape.clone(); // [77, D] or [1, 77, D]
        assert_close(&format!("ti.last_hidden_state [{}]", c.description), &got, &want, 1e-4);
    }
}

#[test]
fn a_pt_embedding_gives_the_same_conditioning_as_safetensors() {
    let cpu = sdw::device::select(sdw::device::DeviceChoice::Cpu).unwrap();
    let st = load(cpu.clone(), &embeddings_dir("st", &["tinyti.safetensors"]));
    let pt = load(cpu, &embeddings_dir("pt", &["pickle/ti/tinyti.pt"]));
    let prompt = "a portrait of (tinyti:1.2) person";
    let a = sdw::model::layers::to_host(st.encode_prompt(prompt, 1));
    let b = sdw::model::layers::to_host(pt.encode_prompt(prompt, 1));
    assert!(a.data.iter().zip(&b.data).all(|(x, y)| x.to_bits() == y.to_bits()), ".pt and .safetensors differ");
}

#[test]
fn emphasis_applies_to_embedding_vectors_and_negative_prompts_use_them() {
    let cpu = sdw::device::select(sdw::device::DeviceChoice::Cpu).unwrap();
    let dir = embeddings_dir("emph", &["tinyti.safetensors"]);
    let sd = load(cpu, &dir);
    let chunks = weighted_chunks_with(&sd.tokenizer, "portrait of (tinyti:1.3), [tinyti]", &sd.embeddings);
    let fixes = &chunks[0].fixes;
    assert_eq!(fixes.len(), 2);
    let w = &chunks[0].weights;
    assert_eq!(&w[fixes[0].offset + 1..fixes[0].offset + 3], &[1.3, 1.3]);
    let low = (1.0f64 / 1.1) as f32;
    assert_eq!(&w[fixes[1].offset + 1..fixes[1].offset + 3], &[low, low]);

    // Used only in the negative prompt: it still conditions, and the infotext names it.
    let with = sdw::model::layers::to_host(sd.encode_prompt("tinyti", 1));
    let without = sdw::model::layers::to_host(sd.encode_prompt("tiny", 1));
    assert!(rel_err(&with.data, &without.data) > 1e-3);
    let info = &sd.infotexts(&params("a house", "tinyti, blurry"), &[])[0];
    let hash = &sdw::output::sha256_file(&dir.join("tinyti.safetensors")).unwrap()[..12];
    assert!(info.contains(&format!("TI hashes: \"tinyti: {hash}\"")), "{info}");
    assert!(!sd.infotexts(&params("a house", "blurry"), &[])[0].contains("TI hashes"));
}

#[test]
fn an_embedding_that_does_not_fit_is_refused_when_used() {
    let cpu = sdw::device::select(sdw::device::DeviceChoice::Cpu).unwrap();
    let dir = embeddings_dir("wide", &["tinyti.safetensors"]);
    // A 768-wide (SD 1.x-sized) embedding next to the tiny model's 128-wide CLIP.
    let data = vec![0u8; 768 * 4];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1, 768], &data).unwrap();
    safetensors::serialize_to_file([("emb_params", view)], None, &dir.join("wideone.safetensors")).unwrap();
    std::fs::write(dir.join("notes.txt"), "not an embedding").unwrap();
    let sd = load(cpu, &dir);
    assert_eq!(sd.embeddings.usable(), 1);
    assert_eq!(sd.embeddings.refused().count(), 1);
    assert!(sd.txt2img(&params("tinyti in a garden", ""), &mut sdw::sampling::NoProgress).is_ok());
    let err = sd.txt2img(&params("a house", "wideone"), &mut sdw::sampling::NoProgress).err().unwrap().to_string();
    assert!(err.contains("wideone") && err.contains("768-wide") && err.contains("128 wide"), "{err}");
}

#[test]
fn sdw_embeddings_lists_the_folder() {
    let dir = embeddings_dir("list", &["tinyti.safetensors"]);
    std::fs::create_dir_all(dir.join("more")).unwrap();
    std::fs::copy(fixture("pickle/ti/tinyti.pt"), dir.join("more/other.pt")).unwrap();
    let o =
        Command::new(env!("CARGO_BIN_EXE_sdw")).args(["embeddings", "--embeddings-dir"]).arg(&dir).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    eprintln!("{text}");
    let hash = &sdw::output::sha256_file(&dir.join("tinyti.safetensors")).unwrap()[..12];
    let line = text.lines().find(|l| l.starts_with("tinyti ")).expect("tinyti listed");
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(cols, ["tinyti", "2", "128", "unknown", hash]);
    assert!(text.lines().any(|l| l.starts_with("other ")), "{text}");
}
