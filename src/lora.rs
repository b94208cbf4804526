//! LoRA files as users download them (kohya-ss layout: `lora_unet_*` / `lora_te_*` with
//! `.lora_down.weight`, `.lora_up.weight`, `.alpha`; diffusers/PEFT layouts are read into the
//! same kohya names), merged into the base weights the way A1111 does:
//! `W += multiplier * alpha / rank * up @ down` (no alpha: alpha = rank, i.e. scale 1).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::weights::{Component, HostTensor, SafetensorsFile, WeightsError};

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("{path}: not a LoRA file (no lora_down/lora_up tensors)")]
    NotLora { path: PathBuf },
    #[error("{path}: this LoRA does not fit the model: `{key}` {why}")]
    Mismatch { path: PathBuf, key: String, why: String },
}

/// kohya's module-name prefix for the UNet.
pub const UNET_PREFIX: &str = "lora_unet";
/// kohya's module-name prefix for the (SD 1.x) text encoder.
pub const TEXT_PREFIX: &str = "lora_te";

/// The kohya name of the diffusers module `module` under a network `prefix`: the path with
/// dots turned into underscores (`lora_unet` + `down_blocks.0.attentions.0.proj_in` ->
/// `lora_unet_down_blocks_0_attentions_0_proj_in`). Files read in other layouts, the merge
/// targets and trained adapters are all named through it, so that they match.
pub fn kohya_name(prefix: &str, module: &str) -> String {
    format!("{prefix}_{}", module.replace('.', "_"))
}

/// kohya module name -> (component, diffusers weight name).
pub type Targets = HashMap<String, (Component, String)>;

/// A weight update `multiplier * alpha / rank * up @ down` for one model weight, in
/// PyTorch layout (`[out, in * kh * kw]` flattened).
pub type Deltas = HashMap<(Component, String), Vec<f32>>;

/// The summed updates of every LoRA (they add up, as A1111 merges them), checked against
/// the model's weight shapes (`shape_of`, PyTorch layout).
pub fn deltas(
    loras: &[(Lora, Strength)],
    targets: &Targets,
    shape_of: impl Fn(Component, &str) -> Option<Vec<usize>>,
) -> Result<Deltas, LoraError> {
    let mut sum = Deltas::new();
    for (lora, strength) in loras {
        lora.add_deltas(&mut sum, targets, &shape_of, *strength)?;
    }
    Ok(sum)
}

/// A module's down, up and alpha as found in a file.
type PartsFound = (Option<HostTensor>, Option<HostTensor>, Option<f32>);

/// One low-rank update: `delta = alpha / rank * up @ down`.
struct Pair {
    down: HostTensor,
    up: HostTensor,
    alpha: Option<f32>,
}

/// A LoRA file, opened and grouped by target module.
pub struct Lora {
    pub path: PathBuf,
    modules: BTreeMap<String, Pair>,
}

/// How strongly to apply a LoRA to each network (A1111's `te=` / `unet=`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Strength {
    pub text_encoder: f32,
    pub unet: f32,
}

impl Strength {
    pub fn both(m: f32) -> Self {
        Self { text_encoder: m, unet: m }
    }
}

impl Lora {
    pub fn open(path: &Path) -> Result<Self, LoraError> {
        let file = SafetensorsFile::open(path)?;
        let mut parts: BTreeMap<String, PartsFound> = BTreeMap::new();
        for key in file.keys() {
            let Some((module, part)) = parse_key(key) else { continue };
            let entry = parts.entry(module).or_default();
            match part {
                Part::Down => entry.0 = Some(file.tensor(key)?),
                Part::Up => entry.1 = Some(file.tensor(key)?),
                Part::Alpha => entry.2 = file.tensor(key)?.data.first().copied(),
            }
        }
        let modules: BTreeMap<String, Pair> =
            parts.into_iter().filter_map(|(m, (d, u, a))| Some((m, Pair { down: d?, up: u?, alpha: a }))).collect();
        if modules.is_empty() {
            return Err(LoraError::NotLora { path: path.to_owned() });
        }
        Ok(Self { path: path.to_owned(), modules })
    }

    /// The name A1111 shows: the file stem.
    pub fn name(&self) -> String {
        self.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
    }

    /// Adds this LoRA's updates to `sum`. A file none of whose modules matches the model is
    /// refused (naming its first key); a partly matching one is reported with a count.
    fn add_deltas(
        &self,
        sum: &mut Deltas,
        targets: &Targets,
        shape_of: &dyn Fn(Component, &str) -> Option<Vec<usize>>,
        strength: Strength,
    ) -> Result<usize, LoraError> {
        let mut merged = 0;
        let mut unmatched = Vec::new();
        for (module, pair) in &self.modules {
            let Some((component, weight_name)) = targets.get(module) else {
                unmatched.push(module.clone());
                continue;
            };
            let m = match component {
                Component::TextEncoder => strength.text_encoder,
                _ => strength.unet,
            };
            let shape = shape_of(*component, weight_name).unwrap_or_default();
            let delta = pair.delta().ok_or_else(|| self.mismatch(module, "has inconsistent down/up ranks"))?;
            if delta.len() != shape.iter().product::<usize>() {
                return Err(
                    self.mismatch(module, &format!("has shape {:?}, the model's weight {:?}", pair.shape(), shape))
                );
            }
            let acc = sum.entry((*component, weight_name.clone())).or_insert_with(|| vec![0.0; delta.len()]);
            for (a, d) in acc.iter_mut().zip(&delta) {
                *a += m * d;
            }
            merged += 1;
        }
        if merged == 0 {
            let first = unmatched.first().cloned().unwrap_or_default();
            let hint = if family(&unmatched) == "SDXL" { " (an SDXL LoRA)" } else { "" };
            return Err(self.mismatch(&first, &format!("matches no layer of this SD 1.x model{hint}")));
        }
        if !unmatched.is_empty() {
            eprintln!(
                "warning: {}: {} of {} LoRA modules match no layer of the model (first: {})",
                self.path.display(),
                unmatched.len(),
                self.modules.len(),
                unmatched[0]
            );
        }
        Ok(merged)
    }

    fn mismatch(&self, key: &str, why: &str) -> LoraError {
        LoraError::Mismatch { path: self.path.clone(), key: key.to_owned(), why: why.to_owned() }
    }
}

impl Pair {
    fn shape(&self) -> Vec<usize> {
        let mut s = vec![self.up.shape[0]];
        s.extend_from_slice(&self.down.shape[1..]);
        s
    }

    /// `alpha / rank * up @ down`, flattened like the weight (`[out, in * kh * kw]`).
    fn delta(&self) -> Option<Vec<f32>> {
        let rank = self.down.shape[0];
        let out = self.up.shape[0];
        if self.up.data.len() != out * rank {
            return None;
        }
        let inner = self.down.data.len() / rank;
        let scale = self.alpha.unwrap_or(rank as f32) / rank as f32;
        let mut d = vec![0f32; out * inner];
        for o in 0..out {
            for r in 0..rank {
                let u = self.up.data[o * rank + r] * scale;
                let row = &self.down.data[r * inner..(r + 1) * inner];
                for (x, dv) in d[o * inner..(o + 1) * inner].iter_mut().zip(row) {
                    *x += u * dv;
                }
            }
        }
        Some(d)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Down,
    Up,
    Alpha,
}

/// A LoRA tensor name in any layout users have -> (kohya module name, which tensor):
/// kohya (`lora_unet_…_to_q.lora_down.weight`), PEFT as diffusers' DreamBooth-LoRA script
/// writes it (`unet.….to_q.lora_A.weight` / `lora_B`, `text_encoder.….q_proj.lora_A.weight`),
/// diffusers' `….lora.down.weight`, and the older attention-processor names
/// (`unet.….attn1.processor.to_q_lora.down.weight`). PEFT and diffusers modules are named by
/// their diffusers path, which becomes the kohya name with dots turned into underscores.
pub fn parse_key(key: &str) -> Option<(String, Part)> {
    const SUFFIXES: [(&str, Part); 7] = [
        (".lora_down.weight", Part::Down),
        (".lora_up.weight", Part::Up),
        (".lora_A.weight", Part::Down),
        (".lora_B.weight", Part::Up),
        (".lora.down.weight", Part::Down),
        (".lora.up.weight", Part::Up),
        (".alpha", Part::Alpha),
    ];
    let processor = [(".down.weight", Part::Down), (".up.weight", Part::Up)];
    let (module, part) = SUFFIXES
        .iter()
        .find_map(|(suffix, part)| key.strip_suffix(suffix).map(|m| (m.to_owned(), *part)))
        .or_else(|| {
            processor.iter().find_map(|(suffix, part)| {
                let m = key.strip_suffix(suffix)?.strip_suffix("_lora")?;
                Some((m.replace(".processor.", ".").replace(".to_out", ".to_out.0"), *part))
            })
        })?;
    if module.starts_with("lora_") {
        return Some((module, part));
    }
    let module = module.strip_prefix("base_model.model.").unwrap_or(&module);
    let (prefix, path) = [("text_encoder_2.", "lora_te2"), ("text_encoder.", TEXT_PREFIX), ("unet.", UNET_PREFIX)]
        .iter()
        .find_map(|(from, to)| module.strip_prefix(from).map(|rest| (*to, rest)))?;
    Some((kohya_name(prefix, path), part))
}

/// Which model family a LoRA was made for, from its kohya key names:
/// "SDXL", "SD 1.x" or "unknown".
fn family(keys: &[impl AsRef<str>]) -> &'static str {
    let any = |p: &str| keys.iter().any(|k| k.as_ref().contains(p));
    if any("lora_te1_") || any("lora_te2_") || any("input_blocks") {
        "SDXL"
    } else if any("lora_unet_down_blocks") || any("lora_unet_up_blocks") || any("lora_te_text_model") {
        "SD 1.x"
    } else {
        "unknown"
    }
}

/// kohya module name (`lora_unet_down_blocks_0_attentions_0_proj_in`) -> the weight it
/// updates, built from the model's own diffusers names (dots became underscores).
pub fn kohya_targets<'a>(weights: impl Iterator<Item = (Component, &'a str)>) -> Targets {
    let mut map = HashMap::new();
    for (component, name) in weights {
        let prefix = match component {
            Component::Unet => UNET_PREFIX,
            Component::TextEncoder => TEXT_PREFIX,
            Component::Vae => continue,
        };
        if let Some(stem) = name.strip_suffix(".weight") {
            map.insert(kohya_name(prefix, stem), (component, name.to_owned()));
        }
    }
    map
}

/// A1111's LoRA hash ("addnet" hash): SHA-256 of a safetensors file past its header,
/// first 12 hex digits — what `Lora hashes:` in an infotext holds.
pub fn addnet_hash(path: &Path) -> std::io::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)?;
    f.seek(SeekFrom::Start(8 + u64::from_le_bytes(len)))?;
    Ok(crate::output::sha256_hex(f)?[..12].to_owned())
}

/// A `<lora:NAME:0.8>` or `<lora:NAME:te=0.5:unet=1.0>` tag found in a prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraTag {
    pub name: String,
    pub strength: Strength,
}

/// Removes A1111 `<lora:...>` tags from `prompt`, returning the cleaned text and the tags.
pub fn extract_tags(prompt: &str) -> Result<(String, Vec<LoraTag>), String> {
    let mut out = String::new();
    let mut tags = Vec::new();
    let mut rest = prompt;
    while let Some(start) = rest.find("<lora:") {
        out.push_str(&rest[..start]);
        let body_start = start + "<lora:".len();
        let end =
            rest[body_start..].find('>').ok_or_else(|| format!("unclosed LoRA tag in prompt: {}", &rest[start..]))?;
        tags.push(parse_tag(&rest[body_start..body_start + end])?);
        rest = &rest[body_start + end + 1..];
    }
    out.push_str(rest);
    Ok((out, tags))
}

fn parse_tag(body: &str) -> Result<LoraTag, String> {
    let mut parts = body.split(':');
    let name = parts.next().unwrap_or_default().trim().to_owned();
    let mut strength = Strength::both(1.0);
    let num = |v: &str| v.trim().parse::<f32>().map_err(|_| format!("bad LoRA weight `{v}` in <lora:{body}>"));
    for (i, p) in parts.enumerate() {
        match p.split_once('=') {
            Some(("te", v)) => strength.text_encoder = num(v)?,
            Some(("unet", v)) => strength.unet = num(v)?,
            Some((k, _)) => return Err(format!("unknown LoRA option `{k}` in <lora:{body}>")),
            // A1111: a first bare number sets both, a second one the UNet alone.
            None if i == 0 => strength = Strength::both(num(p)?),
            None => strength.unet = num(p)?,
        }
    }
    if name.is_empty() {
        return Err(format!("LoRA tag without a name: <lora:{body}>"));
    }
    Ok(LoraTag { name, strength })
}

/// What `sdw loras` shows about a file, read from its header alone.
#[derive(Debug)]
pub struct LoraInfo {
    pub name: String,
    pub modules: usize,
    pub rank: Option<usize>,
    pub alpha: Option<f32>,
    /// "SD 1.x", "SDXL" or "unknown", from the key names.
    pub target: &'static str,
}

impl LoraInfo {
    pub fn inspect(path: &Path) -> Result<Self, LoraError> {
        let file = SafetensorsFile::open(path)?;
        let downs: Vec<(&str, String)> = file
            .keys()
            .filter_map(|k| match parse_key(k) {
                Some((module, Part::Down)) => Some((k, module)),
                _ => None,
            })
            .collect();
        if downs.is_empty() {
            return Err(LoraError::NotLora { path: path.to_owned() });
        }
        let rank = downs.iter().filter_map(|(k, _)| file.shape(k)).map(|s| s[0]).max();
        let alpha = file
            .keys()
            .find(|k| k.ends_with(".alpha"))
            .and_then(|k| file.tensor(k).ok())
            .and_then(|t| t.data.first().copied());
        let target = family(&downs.iter().map(|(_, m)| m.as_str()).collect::<Vec<_>>());
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(Self { name, modules: downs.len(), rank, alpha, target })
    }
}
