//! The real SD 1.5 single-file key set (v1-5-pruned-emaonly, 1,145 tensors) maps onto
//! exactly the diffusers names the models load: every float tensor used, every
//! parameter filled. The tiny diffusers fixture has SD 1.5's exact module structure.

use std::collections::BTreeSet;

use crate::common::fixture;
use sdw::weights::{Component, SafetensorsFile, names};

#[test]
fn sd15_single_file_keys_map_onto_the_model() {
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("sd15-single-file-manifest.json")).unwrap()).unwrap();
    let mut mapped = BTreeSet::new();
    let mut unused = Vec::new();
    for (key, info) in manifest["tensors"].as_object().unwrap() {
        match names::ldm_to_diffusers(key) {
            Some((c, n)) => assert!(mapped.insert((c as u8, n.clone())), "{key} maps onto {n} twice"),
            None => unused.push((key.clone(), info[1].as_str().unwrap().to_owned())),
        }
    }
    // What is left is DDPM buffers, EMA bookkeeping and CLIP's int64 position ids.
    for (key, dtype) in &unused {
        assert!(
            !key.starts_with("model.diffusion_model.") && !key.starts_with("first_stage_model."),
            "unmapped model tensor {key} ({dtype})"
        );
    }

    let mut expected = BTreeSet::new();
    for (c, file) in [
        (Component::Unet, "model/unet/diffusion_pytorch_model.safetensors"),
        (Component::Vae, "model/vae/diffusion_pytorch_model.safetensors"),
        (Component::TextEncoder, "model/text_encoder/model.safetensors"),
    ] {
        for k in SafetensorsFile::open(&fixture(file)).unwrap().keys() {
            expected.insert((c as u8, k.to_owned()));
        }
    }
    // SD 1.5 differs from the tiny model only in widths and CLIP depth: compare the
    // structure with layer numbers folded and width-dependent shortcut convs set apart.
    let shape_of = |set: &BTreeSet<(u8, String)>| -> BTreeSet<(u8, String)> {
        set.iter().filter(|(_, n)| !n.contains(".conv_shortcut.")).map(|(c, n)| (*c, fold_layer(n))).collect()
    };
    let (mapped_s, expected_s) = (shape_of(&mapped), shape_of(&expected));
    let missing: Vec<_> = expected_s.difference(&mapped_s).collect();
    let extra: Vec<_> = mapped_s.difference(&expected_s).collect();
    for (_, n) in mapped.iter().filter(|(_, n)| n.contains(".conv_shortcut.")) {
        let resnet = &n[..n.find(".conv_shortcut.").unwrap()];
        assert!(expected.iter().any(|(_, e)| e.starts_with(&format!("{resnet}.conv1."))), "{n}: no such resnet");
    }
    assert!(missing.is_empty(), "model tensors not filled from SD 1.5: {missing:?}");
    assert!(extra.is_empty(), "SD 1.5 tensors mapped to names the model does not use: {extra:?}");
}

/// `text_model.encoder.layers.11.mlp.fc1.weight` -> `text_model.encoder.layers.N.mlp.fc1.weight`.
fn fold_layer(name: &str) -> String {
    match name.strip_prefix("text_model.encoder.layers.") {
        Some(rest) => format!("text_model.encoder.layers.N.{}", rest.split_once('.').unwrap().1),
        None => name.to_owned(),
    }
}

/// The random-weight model `sdw bench` and `sdw doctor` build in memory has exactly the
/// tensors of a real SD 1.5 checkpoint (names and sizes) and of the tiny fixture (shapes).
#[test]
fn synthetic_layouts_match_real_checkpoints() {
    use sdw::weights::synthetic::Architecture;
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("sd15-single-file-manifest.json")).unwrap()).unwrap();
    let mut real = BTreeSet::new();
    for (key, info) in manifest["tensors"].as_object().unwrap() {
        if let Some((c, n)) = names::ldm_to_diffusers(key) {
            // LDM stores some linear layers as 1x1 convolutions: compare sizes, not ranks.
            let size: u64 = info[0].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).product();
            real.insert((c as u8, n, size));
        }
    }
    let ours: BTreeSet<_> = Architecture::sd15()
        .tensors()
        .into_iter()
        .map(|(c, n, s)| (c as u8, n, s.iter().product::<usize>() as u64))
        .collect();
    assert_eq!(ours.difference(&real).collect::<Vec<_>>(), Vec::<&(u8, String, u64)>::new(), "made but not in SD 1.5");
    assert_eq!(real.difference(&ours).collect::<Vec<_>>(), Vec::<&(u8, String, u64)>::new(), "in SD 1.5 but not made");

    let mut tiny = BTreeSet::new();
    for (c, file) in [
        (Component::Unet, "model/unet/diffusion_pytorch_model.safetensors"),
        (Component::Vae, "model/vae/diffusion_pytorch_model.safetensors"),
        (Component::TextEncoder, "model/text_encoder/model.safetensors"),
    ] {
        let f = SafetensorsFile::open(&fixture(file)).unwrap();
        for k in f.keys() {
            tiny.insert((c as u8, k.to_owned(), f.shape(k).unwrap()));
        }
    }
    let ours: BTreeSet<_> = Architecture::tiny().tensors().into_iter().map(|(c, n, s)| (c as u8, n, s)).collect();
    assert_eq!(ours, tiny);
}
