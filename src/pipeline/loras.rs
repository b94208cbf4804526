//! LoRAs merged into the loaded model and swapped between generations without reading
//! the checkpoint again, as A1111 does: the first time a LoRA touches a weight, its base
//! value is copied to host memory; every later set of LoRAs is merged onto that copy,
//! and a weight no LoRA touches any more gets its copy back — bit for bit.

use std::collections::{HashMap, HashSet};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::Tensor;

use crate::lora::{self, Lora, LoraError, Strength};
use crate::model::layers::{Layout, WeightSlot, to_device, to_host};
use crate::weights::Component;

use super::StableDiffusion;

type Key = (Component, String);

/// The patchable weights of a loaded model and the base values of those LoRAs changed.
#[derive(Default)]
pub struct WeightPatches {
    /// Linear and conv weights of the UNet and text encoder, by diffusers name.
    pub slots: HashMap<Key, WeightSlot>,
    /// Base values (as laid out on the device) of the weights LoRAs currently change.
    base: HashMap<Key, Vec<f32>>,
}

impl WeightPatches {
    pub fn new(unet: HashMap<String, WeightSlot>, clip: HashMap<String, WeightSlot>) -> Self {
        let slots = unet
            .into_iter()
            .map(|(n, s)| ((Component::Unet, n), s))
            .chain(clip.into_iter().map(|(n, s)| ((Component::TextEncoder, n), s)))
            .collect();
        Self { slots, base: HashMap::new() }
    }

    /// How many weights currently differ from the checkpoint's.
    pub fn patched(&self) -> usize {
        self.base.len()
    }
}

impl StableDiffusion {
    /// Makes `loras` (at their strengths) the LoRAs in effect, replacing any set before:
    /// weights they change are merged from their base values, weights only earlier LoRAs
    /// changed get their base values back. `&[]` restores the checkpoint exactly.
    pub fn set_loras(&mut self, loras: &[(Lora, Strength)]) -> Result<(), LoraError> {
        let targets = lora::kohya_targets(self.patches.slots.keys().map(|(c, n)| (*c, n.as_str())));
        let slots = &self.patches.slots;
        let deltas = lora::deltas(loras, &targets, |c, n| slots.get(&(c, n.to_owned())).map(|s| s.shape.clone()))?;

        let touched: HashSet<Key> = self.patches.base.keys().chain(deltas.keys()).cloned().collect();
        self.save_base_values(&touched);
        let mut values = HashMap::new();
        for key in &touched {
            let slot = &self.patches.slots[key];
            let base = &self.patches.base[key];
            let value = match deltas.get(key) {
                Some(delta) => add(base, &device_layout(delta, slot)),
                None => base.clone(),
            };
            values.insert(slot.id, value);
        }
        self.patches.base.retain(|key, _| deltas.contains_key(key));
        let mut writer = Write { values };
        self.unet = self.unet.clone().map(&mut writer);
        self.clip = self.clip.clone().map(&mut writer);
        Ok(())
    }

    /// The current value of a linear or conv weight (diffusers name), as laid out on the
    /// device: what tests compare to check a merge or an un-merge.
    pub fn weight_values(&self, component: Component, name: &str) -> Option<Vec<f32>> {
        let id = self.patches.slots.get(&(component, name.to_owned()))?.id;
        let want = HashMap::from([(id, (component, name.to_owned()))]);
        let mut reader = Read { want: &want, got: HashMap::new() };
        self.unet.visit(&mut reader);
        self.clip.visit(&mut reader);
        reader.got.remove(&id)
    }

    /// Copies to the host the current (= base) values of `keys` not copied yet.
    fn save_base_values(&mut self, keys: &HashSet<Key>) {
        let missing: HashMap<ParamId, Key> = keys
            .iter()
            .filter(|k| !self.patches.base.contains_key(*k))
            .map(|k| (self.patches.slots[k].id, k.clone()))
            .collect();
        if missing.is_empty() {
            return;
        }
        let mut reader = Read { want: &missing, got: HashMap::new() };
        self.unet.visit(&mut reader);
        self.clip.visit(&mut reader);
        for (id, data) in reader.got {
            self.patches.base.insert(missing[&id].clone(), data);
        }
    }
}

fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

/// A PyTorch-layout update laid out as the device holds the weight.
fn device_layout(delta: &[f32], slot: &WeightSlot) -> Vec<f32> {
    match slot.layout {
        Layout::AsIs => delta.to_vec(),
        Layout::Transposed => {
            let out = slot.shape[0];
            let inp = delta.len() / out;
            let mut t = vec![0.0; delta.len()];
            for o in 0..out {
                for i in 0..inp {
                    t[i * out + o] = delta[o * inp + i];
                }
            }
            t
        }
    }
}

/// Reads the values of chosen parameters.
struct Read<'a> {
    want: &'a HashMap<ParamId, Key>,
    got: HashMap<ParamId, Vec<f32>>,
}

impl ModuleVisitor for Read<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.want.contains_key(&param.id) {
            self.got.insert(param.id, to_host(param.val()).data);
        }
    }
}

/// Replaces the values of chosen parameters (same id, shape and device).
struct Write {
    values: HashMap<ParamId, Vec<f32>>,
}

impl ModuleMapper for Write {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        match self.values.remove(&param.id) {
            // In the weight's own dtype: an f16 model stays f16.
            Some(v) => param.map(|t| to_device(v, t.dims(), &t.device()).cast(t.dtype())),
            None => param,
        }
    }
}
