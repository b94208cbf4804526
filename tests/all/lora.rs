//! kohya-ss LoRA merged at generation time, against diffusers with the same merge
//! (`W += m * alpha / rank * up @ down`, m = 0.8).

use crate::common::*;
use sdw::lora::{Lora, LoraTag, Strength, extract_tags};
use sdw::model::layers::{to_device, to_host};
use sdw::pipeline::{GenerationParams, StableDiffusion};
use sdw::sampling::{NoProgress, Sampler};

fn lora() -> Lora {
    Lora::open(&fixture("tiny-lora-kohya.safetensors")).unwrap()
}

/// The UNet on the `unet.*` golden inputs.
fn unet_case(sd: &StableDiffusion) -> sdw::weights::HostTensor {
    let dev = &sd.compute.device;
    let (x, ctx) = (golden("unet.x"), golden("unet.context"));
    let t = golden("unet.t").data;
    to_host(sd.unet.forward(to_device(x.data, [2, 4, 8, 12], dev), &t, &to_device(ctx.data, [2, 77, 128], dev)))
}

/// CLIP's last hidden state for the `clip.input_ids` golden.
fn clip_case(sd: &StableDiffusion) -> sdw::weights::HostTensor {
    let ids = golden("clip.input_ids");
    let ids: Vec<Vec<u32>> = ids.data.chunks(77).map(|r| r.iter().map(|&v| v as u32).collect()).collect();
    to_host(sd.clip.forward(&ids, 1, &sd.compute.device))
}

#[test]
fn kohya_lora_matches_diffusers_merge() {
    let cases = cases();
    let case = &cases["cases"]["txt2img_lora.euler_a"];
    for c in devices() {
        let sd = StableDiffusion::load_with_loras(
            &fixture("tiny-sd-fp16.safetensors"),
            c.clone(),
            &[(lora(), Strength::both(0.8))],
        )
        .unwrap();
        let eps = unet_case(&sd);
        assert_close(&format!("lora.unet_eps [{}]", c.description), &eps, &golden("lora.unet_eps"), 1e-4);

        let h = clip_case(&sd);
        assert_close(&format!("lora.clip [{}]", c.description), &h, &golden("lora.clip_last_hidden_state"), 1e-4);

        let p = GenerationParams {
            prompt: case["prompt"].as_str().unwrap().into(),
            negative_prompt: case["negative_prompt"].as_str().unwrap().into(),
            sampler: Sampler::parse("euler_a").unwrap(),
            steps: 8,
            cfg_scale: 7.0,
            seed: case["seed"].as_u64().unwrap(),
            width: 64,
            height: 64,
            clip_skip: 1,
            lora_hashes: Vec::new(),
            ..Default::default()
        };
        let out = sd.txt2img(&p, &mut NoProgress).unwrap();
        assert_close(
            &format!("txt2img_lora latent [{}]", c.description),
            &out.latents,
            &golden("txt2img_lora.euler_a.latent"),
            1e-3,
        );
        assert_close(
            &format!("txt2img_lora image [{}]", c.description),
            &out.image,
            &golden("txt2img_lora.euler_a.image"),
            1e-3,
        );
    }
}

#[test]
fn lora_tags_are_parsed_and_removed() {
    let (text, tags) =
        extract_tags("photo of sks person <lora:me:0.8>, <lora:style:te=0.5:unet=1.0> astronaut").unwrap();
    // The tag text goes, as in A1111; CLIP's normaliser folds the leftover spaces.
    assert_eq!(text, "photo of sks person ,  astronaut");
    assert_eq!(tags[0], LoraTag { name: "me".into(), strength: Strength::both(0.8) });
    assert_eq!(tags[1], LoraTag { name: "style".into(), strength: Strength { text_encoder: 0.5, unet: 1.0 } });
    let (_, tags) = extract_tags("<lora:plain>").unwrap();
    assert_eq!(tags[0].strength, Strength::both(1.0));
    assert!(extract_tags("<lora:x:abc>").unwrap_err().contains("abc"));
    assert!(extract_tags("<lora:open").is_err());
}

#[test]
fn a_lora_that_does_not_fit_is_refused_by_name() {
    let dir = std::env::temp_dir().join(format!("sdw-lora-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let down = f32s(&[0.0; 4 * 32]);
    let up = f32s(&[0.0; 32 * 4]);
    let write = |name: &str, key: &str| {
        let path = dir.join(name);
        let d = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4, 32], &down).unwrap();
        let u = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![32, 4], &up).unwrap();
        safetensors::serialize_to_file(
            [(format!("{key}.lora_down.weight"), d), (format!("{key}.lora_up.weight"), u)],
            None,
            &path,
        )
        .unwrap();
        path
    };
    let cpu = sdw::device::select(sdw::device::DeviceChoice::Cpu).unwrap();
    let model = fixture("tiny-sd-fp16.safetensors");

    let sdxl = write("sdxl.safetensors", "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q");
    let err =
        StableDiffusion::load_with_loras(&model, cpu.clone(), &[(Lora::open(&sdxl).unwrap(), Strength::both(1.0))])
            .err()
            .unwrap()
            .to_string();
    assert!(err.contains("sdxl.safetensors") && err.contains("input_blocks") && err.contains("SDXL"), "{err}");

    // attn2.to_k takes 128-wide context, not 32: a shape mismatch, named.
    let wrong = write("wrong.safetensors", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k");
    let err = StableDiffusion::load_with_loras(&model, cpu, &[(Lora::open(&wrong).unwrap(), Strength::both(1.0))])
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("wrong.safetensors") && err.contains("attn2_to_k"), "{err}");
}

/// `<lora:NAME:0.8>` in the prompt and `--lora PATH:0.8` both reproduce the reference
/// image, and the infotext carries A1111's `Lora hashes`.
#[test]
fn cli_applies_lora_from_tag_and_flag() {
    let cases = cases();
    let case = &cases["cases"]["txt2img_lora.euler_a"];
    let dir = std::env::temp_dir().join(format!("sdw-lora-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let want = rgb_bytes(&fixture("txt2img-lora-euler_a.png"));
    let prompt = case["prompt"].as_str().unwrap();
    let lora_file = fixture("tiny-lora-kohya.safetensors");
    let flag = format!("{}:0.8", lora_file.display());
    for (i, (p, extra)) in [
        (
            format!("{prompt} <lora:tiny-lora-kohya:0.8>"),
            vec!["--lora-dir", fixture("").to_str().unwrap()].into_iter().map(String::from).collect::<Vec<_>>(),
        ),
        (prompt.to_owned(), vec!["--lora".to_owned(), flag.clone()]),
    ]
    .into_iter()
    .enumerate()
    {
        let out = dir.join(format!("lora-{i}.png"));
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_sdw"))
            .env("SDW_CACHE_DIR", &dir)
            .args(["txt2img", "--device", "cpu", "--model"])
            .arg(fixture("tiny-sd-fp16.safetensors"))
            .args(["--prompt", &p, "--negative-prompt", case["negative_prompt"].as_str().unwrap()])
            .args(["--sampler", "euler_a", "--steps", "8", "--cfg-scale", "7", "--seed", &case["seed"].to_string()])
            .args(["--width", "64", "--height", "64", "-o"])
            .arg(&out)
            .args(&extra)
            .status()
            .unwrap();
        assert!(status.success());
        let worst = max_level_diff(&rgb_bytes(&out), &want);
        assert!(worst <= 2, "run {i}: pixels differ by {worst}");
        let text = sdw::output::read_parameters(&out).unwrap().unwrap();
        let hash = sdw::lora::addnet_hash(&lora_file).unwrap();
        assert!(text.contains(&format!("Lora hashes: \"tiny-lora-kohya: {hash}\"")), "{text}");
    }
}

#[test]
fn loras_command_lists_rank_alpha_target_and_hash() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sdw"))
        .args(["loras", "--lora-dir"])
        .arg(fixture(""))
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let hash = sdw::lora::addnet_hash(&fixture("tiny-lora-kohya.safetensors")).unwrap();
    // hashlib.sha256(data[8 + header_len:]).hexdigest()[:12], as A1111 computes it.
    assert_eq!(hash, "b75c031dd7b8");
    let line = text.lines().find(|l| l.starts_with("tiny-lora-kohya")).unwrap_or_else(|| panic!("{text}"));
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(cols, ["tiny-lora-kohya", "4", "2", "211", "SD", "1.x", hash.as_str()], "{text}");
    assert!(!text.contains("golden"), "non-LoRA files are skipped: {text}");
}

#[test]
fn lora_key_layouts_map_to_kohya_names() {
    use sdw::lora::{Part, parse_key};
    let k = |s: &str| parse_key(s);
    let unet = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    assert_eq!(k(&format!("{unet}.lora_down.weight")), Some((unet.into(), Part::Down)));
    let peft = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    assert_eq!(k(&format!("{peft}.lora_A.weight")), Some((unet.into(), Part::Down)));
    assert_eq!(k(&format!("{peft}.lora_B.weight")), Some((unet.into(), Part::Up)));
    assert_eq!(k(&format!("{peft}.lora.up.weight")), Some((unet.into(), Part::Up)));
    assert_eq!(k(&format!("{peft}.alpha")), Some((unet.into(), Part::Alpha)));
    assert_eq!(
        k("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight"),
        Some((unet.into(), Part::Down))
    );
    assert_eq!(
        k("unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight"),
        Some(("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0".into(), Part::Up))
    );
    assert_eq!(
        k("text_encoder.text_model.encoder.layers.3.self_attn.q_proj.lora_A.weight"),
        Some(("lora_te_text_model_encoder_layers_3_self_attn_q_proj".into(), Part::Down))
    );
    assert_eq!(
        k("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight").unwrap().0,
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    );
    assert_eq!(k("unet.conv_in.weight"), None);
}

/// The kohya fixture's tensors renamed to the PEFT layout diffusers' `train_dreambooth_lora.py`
/// writes (`unet.<module>.lora_A/lora_B.weight`, `text_encoder.<module>…`, `.alpha` kept):
/// the same merge, so the same goldens.
#[test]
fn peft_lora_gives_the_kohya_result() {
    use sdw::weights::{Checkpoint, Component};
    let ckpt = Checkpoint::open(&fixture("tiny-sd-fp16.safetensors")).unwrap();
    let mut diffusers_name = std::collections::HashMap::new();
    for (component, kohya, peft) in
        [(Component::Unet, "lora_unet_", "unet."), (Component::TextEncoder, "lora_te_", "text_encoder.")]
    {
        for name in ckpt.names(component) {
            if let Some(stem) = name.strip_suffix(".weight") {
                diffusers_name.insert(format!("{kohya}{}", stem.replace('.', "_")), format!("{peft}{stem}"));
            }
        }
    }
    let kohya = sdw::train::adapters::read_tensors(&fixture("tiny-lora-kohya.safetensors")).unwrap();
    let renamed: Vec<(String, sdw::weights::HostTensor)> = kohya
        .into_iter()
        .map(|(key, t)| {
            let (module, part) = key.split_once('.').unwrap();
            let part = match part {
                "lora_down.weight" => "lora_A.weight",
                "lora_up.weight" => "lora_B.weight",
                other => other,
            };
            (format!("{}.{part}", diffusers_name[module]), t)
        })
        .collect();
    let dir = std::env::temp_dir().join(format!("sdw-peft-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny-lora-peft.safetensors");
    sdw::train::state::write_safetensors(&path, &renamed, Default::default()).unwrap();
    let info = sdw::lora::LoraInfo::inspect(&path).unwrap();
    assert_eq!(info.target, "SD 1.x");
    for c in devices() {
        let peft = Lora::open(&path).unwrap();
        let sd = StableDiffusion::load_with_loras(
            &fixture("tiny-sd-fp16.safetensors"),
            c.clone(),
            &[(peft, Strength::both(0.8))],
        )
        .unwrap();
        let eps = unet_case(&sd);
        assert_close(&format!("PEFT lora.unet_eps [{}]", c.description), &eps, &golden("lora.unet_eps"), 1e-4);
        let h = clip_case(&sd);
        assert_close(&format!("PEFT lora.clip [{}]", c.description), &h, &golden("lora.clip_last_hidden_state"), 1e-4);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every LoRA-patchable weight of the model, by name.
fn all_weights(sd: &StableDiffusion) -> Vec<(String, Vec<u32>)> {
    let mut keys: Vec<_> = sd.patches.slots.keys().cloned().collect();
    keys.sort_by(|a, b| (a.0 as u8, &a.1).cmp(&(b.0 as u8, &b.1)));
    keys.into_iter()
        .map(|(c, n)| {
            let bits = sd.weight_values(c, &n).unwrap().iter().map(|v| v.to_bits()).collect();
            (format!("{c:?} {n}"), bits)
        })
        .collect()
}

#[test]
fn switching_loras_needs_no_reload_and_unmerges_bit_exactly() {
    let cpu = sdw::device::select(sdw::device::DeviceChoice::Cpu).unwrap();
    // A private copy of the checkpoint, deleted once loaded: switching cannot read it.
    let dir = std::env::temp_dir().join(format!("sdw-lora-switch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("model.safetensors");
    std::fs::copy(fixture("tiny-sd-fp16.safetensors"), &model).unwrap();
    let base = all_weights(&StableDiffusion::load(&model, cpu.clone()).unwrap());
    let other = Strength { text_encoder: 0.5, unet: 1.25 };
    let want_other = all_weights(&StableDiffusion::load_with_loras(&model, cpu.clone(), &[(lora(), other)]).unwrap());
    let mut sd = StableDiffusion::load_with_loras(&model, cpu, &[(lora(), Strength::both(0.8))]).unwrap();
    std::fs::remove_file(&model).unwrap();
    let patched = sd.patches.patched();
    assert!(patched > 0);

    sd.set_loras(&[(lora(), other)]).unwrap();
    assert!(all_weights(&sd) == want_other, "switching strengths differs from loading with them");
    sd.set_loras(&[]).unwrap();
    assert_eq!(sd.patches.patched(), 0);
    let now = all_weights(&sd);
    let changed: Vec<&String> = now.iter().zip(&base).filter(|(a, b)| a.1 != b.1).map(|(a, _)| &a.0).collect();
    assert!(changed.is_empty(), "not restored bit-exactly: {changed:?}");
    eprintln!("{patched} weights merged, switched and restored bit-exactly ({} weights compared)", base.len());

    // The restored model generates what the LoRA-free model generates, and the LoRA again
    // what the reference says.
    assert_close("unet eps after un-merge", &unet_case(&sd), &golden("unet.eps"), 1e-4);
    sd.set_loras(&[(lora(), Strength::both(0.8))]).unwrap();
    assert_close("lora.unet_eps after re-merge", &unet_case(&sd), &golden("lora.unet_eps"), 1e-4);
}

/// `--prompts-file`: one model load, each line's LoRA tags switched in; a line without
/// tags gives the plain model's image bit for bit (the LoRA was un-merged exactly).
#[test]
fn prompts_file_switches_loras_between_lines() {
    let dir = temp_dir("lora-prompts");
    std::fs::copy(fixture("tiny-lora-kohya.safetensors"), dir.join("tiny.safetensors")).unwrap();
    let prompt = "a photo of sks person as an astronaut, (stars:1.2)";
    std::fs::write(dir.join("prompts.txt"), format!("{prompt} <lora:tiny:0.8>\n\n{prompt}\n")).unwrap();
    let sdw = |extra: &[&str], out: &str| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_sdw"))
            .env("SDW_CACHE_DIR", &dir)
            .args(["txt2img", "--model", fixture("tiny-sd-fp16.safetensors").to_str().unwrap(), "--device", "cpu"])
            .args(["-n", "blurry, lowres", "--steps", "8", "--seed", "4040056495", "--width", "64", "--height", "64"])
            .args(["--lora-dir", dir.to_str().unwrap(), "--outdir", dir.join(out).to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).lines().map(|l| rgb_bytes(std::path::Path::new(l))).collect::<Vec<_>>()
    };
    let both = sdw(&["--prompts-file", dir.join("prompts.txt").to_str().unwrap()], "file");
    assert_eq!(both.len(), 2);
    let plain = sdw(&["-p", prompt], "plain");
    assert!(both[1] == plain[0], "the line without a LoRA differs from a plain run");
    let worst = max_level_diff(&both[0], &rgb_bytes(&fixture("txt2img-lora-euler_a.png")));
    assert!(worst <= 2, "LoRA line differs from the reference by {worst} levels");
}
