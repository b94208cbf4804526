//! The loaded model: tokenizer, CLIP, UNet and VAE on one device, with the LoRAs,
//! embeddings and VAE override applied; encoding prompts and moving between pixels and
//! latents (with the VAE's CPU fallback).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use burn::module::Module;
use burn::tensor::{DType, Tensor};

use crate::device::{Compute, Dtypes};
use crate::embeddings::{Embedding, EmbeddingDb, EmbeddingError};
use crate::lora::{Lora, Strength};
use crate::model::clip::ClipTextModel;
use crate::model::layers::{Loader, in_dtype, to_device, to_host};
use crate::model::unet::Unet;
use crate::model::vae::{SCALING_FACTOR, Vae};
use crate::text::ClipTokenizer;
use crate::weights::{Checkpoint, Component, HostTensor};

use super::{PipelineError, WeightPatches, conditioning};

/// A loaded SD 1.x model on one device.
pub struct StableDiffusion {
    pub tokenizer: ClipTokenizer,
    pub clip: ClipTextModel,
    pub unet: Unet,
    pub vae: Vae,
    pub compute: Compute,
    pub model_path: PathBuf,
    /// Latent scale (`vae/config.json` `scaling_factor` of a diffusers folder; SD 1.x: 0.18215).
    pub scaling_factor: f32,
    /// Textual-inversion embeddings prompts can use (none until [`Self::load_embeddings`]).
    pub embeddings: EmbeddingDb,
    /// The `--vae` file's stem, when the VAE is not the checkpoint's (infotext "VAE").
    pub vae_name: Option<String>,
    /// Weights LoRAs can patch, and the base values of those patched now.
    pub patches: WeightPatches,
    /// A CPU copy of the VAE in f32, made the first time a decode does not fit the GPU.
    cpu_vae: OnceLock<Vae>,
    /// The VAE in f32, made the first time the f16 one overflowed, and used from then on
    /// (A1111's automatic revert of a half VAE).
    full_vae: OnceLock<Vae>,
    /// A1111's short "Model hash", worked out on first use (a 4 GB file is read once,
    /// then cached on disk by `output::model_hash`).
    short_hash: OnceLock<Option<String>>,
}

impl StableDiffusion {
    pub fn load(path: &Path, compute: Compute) -> Result<Self, PipelineError> {
        Self::load_with_loras(path, compute, &[])
    }

    /// Loads the checkpoint with LoRAs merged into its weights (the file stays untouched;
    /// [`Self::set_loras`] changes them later without reading it again).
    pub fn load_with_loras(path: &Path, compute: Compute, loras: &[(Lora, Strength)]) -> Result<Self, PipelineError> {
        let ckpt = Checkpoint::open(path)?;
        let prediction = ckpt.config("scheduler", "scheduler_config.json", "prediction_type");
        if let Some(p) = prediction.as_ref().and_then(|v| v.as_str())
            && p != "epsilon"
        {
            return Err(PipelineError::Invalid(format!(
                "{}: a {p}-prediction model (SD 2.x 768-v style); sdw supports epsilon-prediction SD 1.x models",
                path.display()
            )));
        }
        Self::from_checkpoint(&ckpt, compute, loras)
    }

    /// A model with random weights of the given layout, made in memory (benchmarks and
    /// `sdw doctor`: real shapes, no file).
    pub fn random(
        arch: &crate::weights::synthetic::Architecture,
        seed: u64,
        compute: Compute,
    ) -> Result<Self, PipelineError> {
        Self::from_checkpoint(&Checkpoint::synthetic(arch, seed, "random-weights"), compute, &[])
    }

    fn from_checkpoint(ckpt: &Checkpoint, compute: Compute, loras: &[(Lora, Strength)]) -> Result<Self, PipelineError> {
        let scaling_factor = ckpt
            .config("vae", "config.json", "scaling_factor")
            .and_then(|v| v.as_f64())
            .map_or(SCALING_FACTOR, |v| v as f32);
        crate::model::budget::fit(compute.max_binding);
        let (dev, dtypes) = (&compute.device, compute.dtypes);
        // On a GPU the weights go to cubecl's persistent pool: exact-fit and never moved. In
        // the pool of activations, whose pages grow with the largest tensor yet, they would be
        // copied onto the new pages whenever the old ones are emptied, as before each recorded
        // step (`model::graph`): a second copy of the weights for a moment.
        let (clip, unet, patches, vae) = dev.memory_persistent_allocations((), |_| -> Result<_, PipelineError> {
            let clip_loader = Loader::with_dtypes(ckpt, Component::TextEncoder, dev, dtypes);
            let clip = ClipTextModel::load(&clip_loader)?;
            let unet_loader = Loader::with_dtypes(ckpt, Component::Unet, dev, dtypes);
            let unet = Unet::load(&unet_loader)?;
            let patches = WeightPatches::new(unet_loader.into_slots(), clip_loader.into_slots());
            let vae = Vae::load(&Loader::with_dtypes(ckpt, Component::Vae, dev, Dtypes::all(dtypes.vae)))?;
            Ok((clip, unet, patches, vae))
        })?;
        let tokenizer = ClipTokenizer::new().map_err(|e| PipelineError::Text(e.to_string()))?;
        let mut sd = Self {
            tokenizer,
            clip,
            unet,
            vae,
            compute,
            model_path: ckpt.path().to_owned(),
            scaling_factor,
            embeddings: EmbeddingDb::default(),
            patches,
            vae_name: None,
            cpu_vae: OnceLock::new(),
            full_vae: OnceLock::new(),
            short_hash: OnceLock::new(),
        };
        sd.set_loras(loras)?;
        Ok(sd)
    }

    /// Replaces the checkpoint's VAE with a separate VAE file (A1111's "SD VAE").
    pub fn load_vae(&mut self, path: &Path) -> Result<(), PipelineError> {
        let ckpt = Checkpoint::open_vae(path)?;
        let (dev, dtypes) = (&self.compute.device, Dtypes::all(self.compute.dtypes.vae));
        // In the persistent pool, as the checkpoint's weights (`from_checkpoint`).
        self.vae = dev.memory_persistent_allocations((), |_| {
            Vae::load(&Loader::with_dtypes(&ckpt, Component::Vae, dev, dtypes))
        })?;
        self.cpu_vae = OnceLock::new();
        self.full_vae = OnceLock::new();
        // The replaced VAE's memory, which the pool would keep otherwise.
        crate::device::release_freed_weights(dev);
        self.vae_name = path.file_name().map(|s| s.to_string_lossy().into_owned());
        Ok(())
    }

    /// The model's name as A1111 shows it: the file stem (or folder name).
    pub fn model_name(&self) -> String {
        self.model_path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
    }

    /// A1111's "Model hash" (10 hex digits); `None` for a model without a file.
    pub fn short_hash(&self) -> Option<String> {
        let hash = || crate::output::model_hash(&self.hash_source()).ok().map(|h| h[..10].to_string());
        self.short_hash.get_or_init(hash).clone()
    }

    /// The file A1111's "Model hash" is computed from (the UNet weights of a diffusers folder).
    fn hash_source(&self) -> PathBuf {
        if self.model_path.is_dir() {
            let dir = self.model_path.join("unet");
            for name in ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"] {
                if dir.join(name).exists() {
                    return dir.join(name);
                }
            }
        }
        self.model_path.clone()
    }

    pub fn encode_prompt(&self, prompt: &str, clip_skip: usize) -> Tensor<3> {
        conditioning::encode_prompt(
            &self.tokenizer,
            &self.clip,
            &self.embeddings,
            prompt,
            clip_skip,
            &self.compute.device,
        )
    }

    /// `prompt` as CLIP reads it, on the device, for [`conditioning::PromptTokens::encode`]
    /// (what training encodes at every step when it trains the text encoder).
    pub fn prompt_tokens(&self, prompt: &str) -> conditioning::PromptTokens {
        conditioning::PromptTokens::new(&self.tokenizer, &self.clip, &self.embeddings, prompt, &self.compute.device)
    }

    /// Makes the textual-inversion embeddings in `dir` (A1111's `embeddings` folder)
    /// available to prompts. Files that fail to load or do not fit this model are kept
    /// by name: a prompt that uses one is refused (see [`Self::embeddings_used`]).
    pub fn load_embeddings(&mut self, dir: &Path) -> Result<(), EmbeddingError> {
        self.embeddings = EmbeddingDb::load_dir(dir, &self.tokenizer, self.clip.hidden_size())?;
        Ok(())
    }

    /// The embeddings `prompt` uses; an error if it names one that cannot be used.
    pub fn embeddings_used(&self, prompt: &str) -> Result<Vec<&Embedding>, EmbeddingError> {
        self.embeddings.used_in(&self.tokenizer, prompt)
    }

    /// Scaled latents `[B, 4, h, w]` -> pixels `[B, 3, 8h, 8w]` on the host.
    pub fn decode(&self, latents: &HostTensor) -> Result<HostTensor, PipelineError> {
        let [b, c, h, w] = latents.shape[..] else { panic!("latents must be 4-D") };
        let scaled: Vec<f32> = latents.data.iter().map(|v| v / self.scaling_factor).collect();
        Ok(self.with_vae([b, h, w], |vae, device| to_host(vae.decode(to_device(scaled.clone(), [b, c, h, w], device)))))
    }

    /// Pixels `[B, 3, H, W]` in [-1, 1] -> the VAE mean x scaling factor `[B, 4, H/8, W/8]` (host).
    pub fn encode_mean(&self, pixels: &HostTensor) -> HostTensor {
        let [b, c, h, w] = pixels.shape[..] else { panic!("pixels must be 4-D") };
        let encode = |vae: &Vae, device: &burn::tensor::Device| {
            to_host(
                vae.encode(to_device(pixels.data.clone(), [b, c, h, w], device)).mean.mul_scalar(self.scaling_factor),
            )
        };
        self.with_vae([b, h / 8, w / 8], encode)
    }

    /// What `run` computes with the VAE for latents `[b, _, h, w]` (see [`Self::vae_fitting`]).
    /// An f16 VAE whose result holds NaN or infinity overflowed: the run is redone, and every
    /// later one made, with an f32 copy of the VAE, as A1111 does. The f16 weights stay loaded
    /// beside the copy (this takes `&self`): a tenth of the model, after a rare event.
    fn with_vae(&self, [b, h, w]: [usize; 3], run: impl Fn(&Vae, &burn::tensor::Device) -> HostTensor) -> HostTensor {
        let (vae, device) = self.vae_fitting(b, h, w);
        let out = run(vae, &device);
        if vae.dtype() == DType::F32 || out.data.iter().all(|v| v.is_finite()) {
            return out;
        }
        self.full_vae.get_or_init(|| {
            eprintln!("note: the VAE overflowed in f16; it runs in f32 from now on (--no-half-vae starts there)");
            let dev = &self.compute.device;
            dev.memory_persistent_allocations((), |_| in_dtype(&self.vae, DType::F32).into_owned())
        });
        let (vae, device) = self.vae_fitting(b, h, w);
        run(vae, &device)
    }

    /// What the VAE computes in now: f16 on a GPU under f16, until it overflowed there.
    pub fn vae_dtype(&self) -> DType {
        self.full_vae.get().unwrap_or(&self.vae).dtype()
    }

    /// Whether the VAE has had to run on the CPU (see `vae_fitting`).
    pub fn vae_fell_back_to_cpu(&self) -> bool {
        self.cpu_vae.get().is_some()
    }

    /// The VAE and device for latents `[b, _, h, w]`. On a GPU whose largest binding cannot
    /// hold the VAE's activations (128 MiB on lavapipe and many iGPUs; SD 1.5 at 512x512
    /// needs 256 MiB to decode) it runs on the CPU instead: exact, and far better than a
    /// failed allocation. The encoder mirrors the decoder, so the decoder's peak bounds both.
    fn vae_fitting(&self, b: usize, h: usize, w: usize) -> (&Vae, burn::tensor::Device) {
        let vae = self.full_vae.get().unwrap_or(&self.vae);
        if self.compute.max_binding.is_none_or(|max| vae.decode_peak_bytes(b, h, w) <= max) {
            return (vae, self.compute.device.clone());
        }
        let cpu = crate::device::cpu().device;
        let vae = self.cpu_vae.get_or_init(|| {
            eprintln!("note: the VAE does not fit this GPU's buffer limit; running it on the CPU");
            in_dtype(&self.vae.clone().to_device(&cpu), DType::F32).into_owned()
        });
        (vae, cpu)
    }
}
