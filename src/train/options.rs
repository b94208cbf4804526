//! `sdw train` options, named as diffusers' `train_dreambooth_lora.py` names them.

use std::path::PathBuf;

use clap::Parser;

use crate::device::{DeviceChoice, Precision};

use super::schedule::LrSchedule;

#[derive(Parser, Debug, Clone)]
#[command(name = "train")]
pub struct TrainOptions {
    /// Base checkpoint (single-file .safetensors or diffusers folder).
    #[arg(long)]
    pub model: PathBuf,
    /// Folder with the subject's photos (png, jpg, webp, bmp).
    #[arg(long)]
    pub instance_dir: PathBuf,
    /// Prompt naming the subject with a rare token, e.g. "photo of sks person".
    #[arg(long)]
    pub instance_prompt: String,
    /// The LoRA file to write (kohya format). Never overwritten: a fresh name is chosen.
    #[arg(long)]
    pub output: PathBuf,
    /// Prior preservation: prompt for the subject's class, e.g. "photo of a person".
    #[arg(long, requires = "class_dir")]
    pub class_prompt: Option<String>,
    /// Prior preservation: folder of class images; missing ones are generated first.
    #[arg(long, requires = "class_prompt")]
    pub class_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 100)]
    pub num_class_images: usize,
    #[arg(long, default_value_t = 1.0)]
    pub prior_loss_weight: f32,
    /// Training images are resized (shorter side) and cropped to this square size.
    #[arg(long, default_value_t = 512)]
    pub resolution: usize,
    /// Crop the centre (else a random crop, drawn once per image from the seed).
    #[arg(long)]
    pub center_crop: bool,
    /// Mirror images at random (both orientations are encoded once and cached).
    #[arg(long)]
    pub random_flip: bool,
    #[arg(long, default_value_t = 4)]
    pub rank: usize,
    /// LoRA alpha (scale = alpha / rank); defaults to the rank.
    #[arg(long)]
    pub alpha: Option<f32>,
    #[arg(long, default_value_t = 1e-4)]
    pub learning_rate: f64,
    #[arg(long, value_enum, default_value_t = LrSchedule::Constant)]
    pub lr_scheduler: LrSchedule,
    #[arg(long, default_value_t = 0)]
    pub lr_warmup_steps: usize,
    /// AdamW weight decay (diffusers' default).
    #[arg(long, default_value_t = 1e-2)]
    pub adam_weight_decay: f32,
    #[arg(long, default_value_t = 800)]
    pub max_train_steps: usize,
    /// Instance images per step (as many class images are added with prior preservation).
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1)]
    pub gradient_accumulation_steps: usize,
    /// Recompute cheap activations in the backward pass instead of storing them (burn's
    /// balanced checkpointing): a little less memory on the CPU, a little more time. On a GPU
    /// it holds more memory, not less (BENCHMARKS.md): leave it off there.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Also train LoRA adapters on the CLIP text encoder's q/k/v/out projections.
    #[arg(long)]
    pub train_text_encoder: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// What the frozen model's weights are kept in: `f16` halves their memory (and changes
    /// nothing for an f16 checkpoint), `auto` is f16 on a GPU with f16 shaders. Training
    /// computes in f32 either way.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
    /// Write a resumable checkpoint every N steps (0: only at the end and on Ctrl-C).
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: usize,
    /// Generate validation images every N steps (0: never).
    #[arg(long, default_value_t = 0)]
    pub validation_every: usize,
    /// Prompt of the validation images (default: the instance prompt).
    #[arg(long)]
    pub validation_prompt: Option<String>,
    /// Number of validation images (a grid, fixed seeds).
    #[arg(long, default_value_t = 4)]
    pub num_validation_images: usize,
    /// Sampling steps for class and validation images.
    #[arg(long, default_value_t = 25)]
    pub sample_steps: usize,
    /// Continue a run from its folder (or one checkpoint file) bit-exactly.
    #[arg(long)]
    pub resume: Option<PathBuf>,
}

impl TrainOptions {
    /// Parses `train --flag value …` as the command line would.
    pub fn try_parse_from_args(args: &[String]) -> Result<Self, clap::Error> {
        Self::try_parse_from(args)
    }

    pub fn alpha(&self) -> f32 {
        self.alpha.unwrap_or(self.rank as f32)
    }

    /// Settings for the images a run generates (class and validation images).
    pub fn sample_params(&self, prompt: &str, seed: u64) -> crate::pipeline::GenerationParams {
        crate::pipeline::GenerationParams {
            prompt: prompt.to_owned(),
            steps: self.sample_steps,
            seed,
            width: self.resolution,
            height: self.resolution,
            ..Default::default()
        }
    }

    pub fn prior_preservation(&self) -> bool {
        self.class_prompt.is_some()
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.resolution == 0 || !self.resolution.is_multiple_of(8) {
            return Err(format!("--resolution must be a positive multiple of 8 (got {})", self.resolution));
        }
        if self.rank == 0 || self.batch_size == 0 || self.gradient_accumulation_steps == 0 || self.max_train_steps == 0
        {
            return Err(
                "--rank, --batch-size, --gradient-accumulation-steps and --max-train-steps must be at least 1".into()
            );
        }
        if self.learning_rate.is_nan() || self.learning_rate <= 0.0 {
            return Err(format!("--learning-rate must be positive (got {})", self.learning_rate));
        }
        Ok(())
    }
}
