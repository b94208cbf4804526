//! Weight-name tables: the original LDM single-file layout (what A1111 users download)
//! mapped onto diffusers names, which the models use. Inverse of diffusers'
//! `convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint` for SD 1.x.

use std::path::Path;

use super::{Component, WeightsError};

const UNET_PREFIX: &str = "model.diffusion_model.";
const VAE_PREFIX: &str = "first_stage_model.";
const CLIP_PREFIX: &str = "cond_stage_model.transformer.";

/// SD 1.x has 2 resnets per UNet level, so LDM numbers blocks in steps of 3
/// (2 resnet/attention pairs + 1 down/up sampler).
const UNET_BLOCKS_PER_LEVEL: usize = 3;

/// ResNet sub-layer names, LDM -> diffusers.
const UNET_RESNET: &[(&str, &str)] = &[
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
];

/// Top-level UNet layers, LDM -> diffusers.
const UNET_TOP: &[(&str, &str)] = &[
    ("time_embed.0", "time_embedding.linear_1"),
    ("time_embed.2", "time_embedding.linear_2"),
    ("input_blocks.0.0", "conv_in"),
    ("out.0", "conv_norm_out"),
    ("out.2", "conv_out"),
];

/// VAE mid-block attention, LDM -> diffusers (LDM stores these as 1x1 convs).
const VAE_ATTN: &[(&str, &str)] =
    &[("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")];

/// Number of VAE decoder levels (SD 1.x: 4); LDM numbers decoder levels bottom-up,
/// diffusers top-down.
const VAE_LEVELS: usize = 4;

/// Maps one single-file key to (component, diffusers name); `None` for keys the
/// engine does not use (EMA copies, DDPM buffers, `position_ids`, ...).
pub fn ldm_to_diffusers(key: &str) -> Option<(Component, String)> {
    if let Some(rest) = key.strip_prefix(UNET_PREFIX) {
        return unet_name(rest).map(|n| (Component::Unet, n));
    }
    if let Some(rest) = key.strip_prefix(VAE_PREFIX) {
        return vae_name(rest).map(|n| (Component::Vae, n));
    }
    if let Some(rest) = key.strip_prefix(CLIP_PREFIX) {
        if rest.ends_with("position_ids") {
            return None;
        }
        // Some exports drop the `text_model.` level.
        let name = if rest.starts_with("text_model.") { rest.to_owned() } else { format!("text_model.{rest}") };
        return Some((Component::TextEncoder, name));
    }
    None
}

fn replace_prefix(s: &str, table: &[(&str, &str)]) -> Option<String> {
    table.iter().find_map(|(from, to)| s.strip_prefix(from).filter(|r| r.starts_with('.')).map(|r| format!("{to}{r}")))
}

fn resnet(rest: &str) -> String {
    replace_prefix(rest, UNET_RESNET).unwrap_or_else(|| rest.to_owned())
}

/// Splits "12.1.rest" into (12, 1, "rest").
fn two_indices(s: &str) -> Option<(usize, usize, &str)> {
    let mut it = s.splitn(3, '.');
    let a = it.next()?.parse().ok()?;
    let b = it.next()?.parse().ok()?;
    Some((a, b, it.next()?))
}

fn is_attention(rest: &str) -> bool {
    ["norm.", "proj_in.", "proj_out.", "transformer_blocks."].iter().any(|p| rest.starts_with(p))
}

fn unet_name(key: &str) -> Option<String> {
    if let Some(n) = replace_prefix(key, UNET_TOP) {
        return Some(n);
    }
    let per = UNET_BLOCKS_PER_LEVEL;
    if let Some(s) = key.strip_prefix("input_blocks.") {
        let (n, slot, rest) = two_indices(s)?;
        let (level, j) = ((n - 1) / per, (n - 1) % per);
        return Some(if j == per - 1 {
            // input_blocks.{3(i+1)}.0.op -> down_blocks.i.downsamplers.0.conv
            format!("down_blocks.{level}.downsamplers.0.conv.{}", rest.strip_prefix("op.")?)
        } else if slot == 0 {
            format!("down_blocks.{level}.resnets.{j}.{}", resnet(rest))
        } else {
            format!("down_blocks.{level}.attentions.{j}.{rest}")
        });
    }
    if let Some(s) = key.strip_prefix("middle_block.") {
        let (slot, rest) = s.split_once('.')?;
        return Some(match slot {
            "0" => format!("mid_block.resnets.0.{}", resnet(rest)),
            "1" => format!("mid_block.attentions.0.{rest}"),
            "2" => format!("mid_block.resnets.1.{}", resnet(rest)),
            _ => return None,
        });
    }
    if let Some(s) = key.strip_prefix("output_blocks.") {
        let (n, slot, rest) = two_indices(s)?;
        let (level, j) = (n / per, n % per);
        return Some(match slot {
            0 => format!("up_blocks.{level}.resnets.{j}.{}", resnet(rest)),
            1 if is_attention(rest) => format!("up_blocks.{level}.attentions.{j}.{rest}"),
            // the upsampler sits in slot 1 without attention, slot 2 with it
            _ => format!("up_blocks.{level}.upsamplers.0.{rest}"),
        });
    }
    None
}

fn vae_name(key: &str) -> Option<String> {
    let key = key.replace("nin_shortcut", "conv_shortcut");
    let (part, rest) = key.split_once('.')?;
    if part == "quant_conv" || part == "post_quant_conv" {
        return Some(key.clone());
    }
    if part != "encoder" && part != "decoder" {
        return None;
    }
    let inner = if let Some(s) = rest.strip_prefix("down.") {
        let (i, tail) = s.split_once('.')?;
        match tail.split_once('.')? {
            ("block", t) => format!("down_blocks.{i}.resnets.{t}"),
            ("downsample", t) => format!("down_blocks.{i}.downsamplers.0.{t}"),
            _ => return None,
        }
    } else if let Some(s) = rest.strip_prefix("up.") {
        let (i, tail) = s.split_once('.')?;
        let level = VAE_LEVELS.checked_sub(1 + i.parse::<usize>().ok()?)?;
        match tail.split_once('.')? {
            ("block", t) => format!("up_blocks.{level}.resnets.{t}"),
            ("upsample", t) => format!("up_blocks.{level}.upsamplers.0.{t}"),
            _ => return None,
        }
    } else if let Some(t) = rest.strip_prefix("mid.block_1.") {
        format!("mid_block.resnets.0.{t}")
    } else if let Some(t) = rest.strip_prefix("mid.block_2.") {
        format!("mid_block.resnets.1.{t}")
    } else if let Some(t) = rest.strip_prefix("mid.attn_1.") {
        format!("mid_block.attentions.0.{}", replace_prefix(t, VAE_ATTN)?)
    } else if let Some(t) = rest.strip_prefix("norm_out.") {
        format!("conv_norm_out.{t}")
    } else {
        rest.to_owned() // conv_in, conv_out
    };
    Some(format!("{part}.{inner}"))
}

/// Refuses checkpoints of other model families with a message that names them.
pub fn detect_family<'a>(path: &Path, mut keys: impl Iterator<Item = &'a str>) -> Result<(), WeightsError> {
    let keys: Vec<&str> = keys.by_ref().collect();
    let any = |p: &str| keys.iter().any(|k| k.starts_with(p));
    let family = if any("conditioner.embedders.") {
        Some("Stable Diffusion XL")
    } else if any("cond_stage_model.model.") {
        Some("Stable Diffusion 2.x (OpenCLIP text encoder)")
    } else if any("model.diffusion_model.joint_blocks.") {
        Some("Stable Diffusion 3")
    } else if any("double_blocks.") || any("model.diffusion_model.double_blocks.") {
        Some("Flux")
    } else if any("lora_unet_") || any("lora_te") {
        Some("LoRA (not a base model; pass it with --lora or <lora:name:weight>)")
    } else {
        None
    };
    match family {
        Some(f) => Err(WeightsError::UnsupportedFamily { path: path.to_owned(), family: f.into() }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unet(k: &str) -> String {
        match ldm_to_diffusers(&format!("{UNET_PREFIX}{k}")) {
            Some((Component::Unet, n)) => n,
            other => panic!("{k}: {other:?}"),
        }
    }

    #[test]
    fn unet_keys() {
        assert_eq!(unet("input_blocks.0.0.weight"), "conv_in.weight");
        assert_eq!(unet("input_blocks.1.0.in_layers.2.weight"), "down_blocks.0.resnets.0.conv1.weight");
        assert_eq!(unet("input_blocks.5.1.proj_in.weight"), "down_blocks.1.attentions.1.proj_in.weight");
        assert_eq!(unet("input_blocks.3.0.op.bias"), "down_blocks.0.downsamplers.0.conv.bias");
        assert_eq!(unet("middle_block.2.out_layers.3.weight"), "mid_block.resnets.1.conv2.weight");
        assert_eq!(unet("output_blocks.2.1.conv.weight"), "up_blocks.0.upsamplers.0.conv.weight");
        assert_eq!(unet("output_blocks.5.2.conv.weight"), "up_blocks.1.upsamplers.0.conv.weight");
        assert_eq!(unet("output_blocks.4.1.norm.weight"), "up_blocks.1.attentions.1.norm.weight");
        assert_eq!(unet("output_blocks.4.0.skip_connection.weight"), "up_blocks.1.resnets.1.conv_shortcut.weight");
        assert_eq!(unet("out.2.bias"), "conv_out.bias");
    }

    #[test]
    fn vae_keys() {
        let v = |k: &str| ldm_to_diffusers(&format!("{VAE_PREFIX}{k}")).unwrap().1;
        assert_eq!(v("decoder.up.0.block.0.nin_shortcut.weight"), "decoder.up_blocks.3.resnets.0.conv_shortcut.weight");
        assert_eq!(v("decoder.up.3.upsample.conv.weight"), "decoder.up_blocks.0.upsamplers.0.conv.weight");
        assert_eq!(v("encoder.down.1.downsample.conv.bias"), "encoder.down_blocks.1.downsamplers.0.conv.bias");
        assert_eq!(v("decoder.mid.attn_1.proj_out.weight"), "decoder.mid_block.attentions.0.to_out.0.weight");
        assert_eq!(v("encoder.norm_out.weight"), "encoder.conv_norm_out.weight");
        assert_eq!(v("post_quant_conv.weight"), "post_quant_conv.weight");
    }
}
