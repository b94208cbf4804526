//! The trainable LoRA set: attaching adapters to a model, naming them as kohya does, and
//! turning them into the tensors a kohya-format file holds.

use std::collections::HashMap;

use burn::module::Param;
use burn::tensor::{Device, Tensor};
use rand::{Rng, RngExt};

use crate::lora;
use crate::model::adapter::{Adaptable, LowRank, Projection};
use crate::model::layers::{to_device, to_host};
use crate::weights::HostTensor;

/// kohya key prefixes (`lora_unet_…`, `lora_te_…`), shared with reading LoRA files.
pub use crate::lora::{TEXT_PREFIX, UNET_PREFIX};

/// The kohya name of projection `p` of `block`, as [`lora::kohya_name`] names a LoRA file's
/// modules: `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`.
fn adapter_name(prefix: &str, block: &dyn Adaptable, p: Projection) -> String {
    lora::kohya_name(prefix, &format!("{}.{}", block.module_name(), block.projection_name(p)))
}

/// Attaches fresh adapters to every projection of `blocks`, initialised as kohya and peft
/// do: `down` ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform, a = sqrt(5)), `up` = 0, so the
/// model starts out unchanged.
pub fn attach_new(blocks: Vec<&mut dyn Adaptable>, rank: usize, alpha: f32, rng: &mut impl Rng, device: &Device) {
    for block in blocks {
        for p in Projection::ALL {
            let [out, inp] = block.projection_shape(p);
            let bound = 1.0 / (inp as f32).sqrt();
            let down: Vec<f32> = (0..rank * inp).map(|_| rng.random_range(-bound..bound)).collect();
            let down = to_device(down, [rank, inp], device);
            let up = Tensor::<2>::zeros([out, rank], device);
            *block.adapters_mut().slot(p) = Some(trainable(down, up, alpha));
        }
    }
}

/// Attaches adapters from kohya-named tensors (a LoRA file or a training checkpoint).
/// Every projection of `blocks` must be present, with matching shapes.
pub fn attach_from(
    blocks: Vec<&mut dyn Adaptable>,
    prefix: &str,
    tensors: &HashMap<String, HostTensor>,
    device: &Device,
) -> Result<(), String> {
    for block in blocks {
        for p in Projection::ALL {
            let name = adapter_name(prefix, block, p);
            let get = |suffix: &str| {
                tensors.get(&format!("{name}.{suffix}")).ok_or_else(|| format!("missing `{name}.{suffix}`"))
            };
            let (down, up) = (get("lora_down.weight")?, get("lora_up.weight")?);
            let rank = down.shape[0];
            let [out, inp] = block.projection_shape(p);
            if down.shape != [rank, inp] || up.shape != [out, rank] {
                return Err(format!(
                    "`{name}`: shapes {:?} / {:?} do not fit a {out}x{inp} projection",
                    down.shape, up.shape
                ));
            }
            let alpha = tensors.get(&format!("{name}.alpha")).map_or(rank as f32, |a| a.data[0]);
            let down = to_device(down.data.clone(), [rank, inp], device);
            let up = to_device(up.data.clone(), [out, rank], device);
            *block.adapters_mut().slot(p) = Some(trainable(down, up, alpha));
        }
    }
    Ok(())
}

fn trainable(down: Tensor<2>, up: Tensor<2>, alpha: f32) -> LowRank {
    LowRank::new(down.autodiff().require_grad(), up.autodiff().require_grad(), alpha)
}

/// Every adapter of `blocks` with its kohya name.
pub fn named<'a>(blocks: Vec<&'a dyn Adaptable>, prefix: &str) -> Vec<(String, &'a LowRank)> {
    let mut out = Vec::new();
    for block in blocks {
        for p in Projection::ALL {
            if let Some(a) = block.adapters().get(p) {
                out.push((adapter_name(prefix, block, p), a));
            }
        }
    }
    out
}

/// Every adapter of `blocks`, mutably, with its kohya name.
pub fn named_mut<'a>(blocks: Vec<&'a mut dyn Adaptable>, prefix: &str) -> Vec<(String, &'a mut LowRank)> {
    let mut out = Vec::new();
    for block in blocks {
        let names: Vec<String> = Projection::ALL.iter().map(|&p| adapter_name(prefix, block, p)).collect();
        for ((_, slot), name) in block.adapters_mut().slots_mut().into_iter().zip(names) {
            if let Some(a) = slot.as_mut() {
                out.push((name, a));
            }
        }
    }
    out
}

/// The kohya tensors of adapters: `.lora_down.weight`, `.lora_up.weight`, `.alpha`.
pub fn to_kohya(adapters: &[(String, &LowRank)]) -> Vec<(String, HostTensor)> {
    let mut out = Vec::with_capacity(adapters.len() * 3);
    for (name, a) in adapters {
        let rank = a.down.dims()[0];
        out.push((format!("{name}.lora_down.weight"), to_host(a.down.val().inner())));
        out.push((format!("{name}.lora_up.weight"), to_host(a.up.val().inner())));
        out.push((format!("{name}.alpha"), HostTensor::new(vec![], vec![a.scale * rank as f32])));
    }
    out
}

/// Replaces a factor with its optimiser update, keeping it a trainable leaf.
pub fn set_factor(param: &mut Param<Tensor<2>>, value: Tensor<2>) {
    *param = Param::from_tensor(value.autodiff().require_grad());
}

/// Every tensor of a safetensors file by name (a LoRA file or a training checkpoint).
pub fn read_tensors(path: &std::path::Path) -> Result<HashMap<String, HostTensor>, crate::weights::WeightsError> {
    let file = crate::weights::SafetensorsFile::open(path)?;
    file.keys().map(|k| Ok((k.to_owned(), file.tensor(k)?))).collect()
}

/// Switches factors between trainable autodiff leaves and plain tensors (for sampling,
/// where a gradient graph would only cost time and memory).
pub fn set_trainable(adapters: Vec<(String, &mut LowRank)>, trainable: bool) {
    for (_, a) in adapters {
        for p in [&mut a.down, &mut a.up] {
            let v = p.val().inner();
            *p = if trainable { Param::from_tensor(v.autodiff().require_grad()) } else { Param::from_tensor(v) };
        }
    }
}
