//! The request and response bodies of A1111's `/sdapi/v1` (its `modules/api/models.py`),
//! and how a request becomes sdw's [`GenerationParams`].
//!
//! Every field is optional: an absent (or `null`) field takes A1111's default, and
//! unknown fields are ignored, so any A1111 client's body parses.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::pipeline::{GenerationParams, HiresFix, Infotext, InpaintingFill, ResizeMode, Variation};
use crate::sampling::{Sampler, ScheduleKind, parse_sampler};

use super::error::ApiError;

/// A1111's API defaults (they differ from its UI's: 50 steps, no sampler = "Euler").
const DEFAULT_STEPS: usize = 50;
const DEFAULT_SAMPLER: &str = "Euler";
/// Bounds that keep one request from taking the server down.
pub const MAX_SIDE: usize = 2048;
pub const MAX_STEPS: usize = 150;
pub const MAX_IMAGES: usize = 64;

/// The fields txt2img and img2img share (`StableDiffusionProcessing`).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct CommonRequest {
    pub prompt: Option<String>,
    pub negative_prompt: Option<String>,
    pub seed: Option<i64>,
    pub subseed: Option<i64>,
    pub subseed_strength: Option<f32>,
    pub sampler_name: Option<String>,
    pub sampler_index: Option<String>,
    pub scheduler: Option<String>,
    pub batch_size: Option<usize>,
    pub n_iter: Option<usize>,
    pub steps: Option<usize>,
    pub cfg_scale: Option<f32>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub denoising_strength: Option<f32>,
    pub override_settings: Option<Map<String, Value>>,
    pub send_images: Option<bool>,
    pub save_images: Option<bool>,
    /// An infotext whose settings fill every field the request leaves out.
    pub infotext: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct Txt2ImgRequest {
    #[serde(flatten)]
    pub common: CommonRequest,
    pub enable_hr: Option<bool>,
    pub hr_scale: Option<f32>,
    pub hr_upscaler: Option<String>,
    pub hr_second_pass_steps: Option<usize>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct Img2ImgRequest {
    #[serde(flatten)]
    pub common: CommonRequest,
    pub init_images: Option<Vec<String>>,
    pub resize_mode: Option<u8>,
    pub mask: Option<String>,
    pub mask_blur: Option<f32>,
    pub mask_blur_x: Option<f32>,
    pub inpainting_fill: Option<u8>,
    pub inpaint_full_res: Option<bool>,
    pub inpaint_full_res_padding: Option<u32>,
    pub inpainting_mask_invert: Option<u8>,
    pub include_init_images: Option<bool>,
}

/// `TextToImageResponse` / `ImageToImageResponse`.
#[derive(Debug, Serialize)]
pub struct ImagesResponse {
    pub images: Vec<String>,
    pub parameters: Value,
    /// `Processed.js()`: a JSON object serialised into a string.
    pub info: String,
}

/// The settings a request asks for, before any model work.
#[derive(Debug)]
pub struct Request {
    pub params: GenerationParams,
    pub n_iter: usize,
    pub send_images: bool,
    pub save_images: bool,
    pub overrides: Map<String, Value>,
}

impl CommonRequest {
    /// `base` (the infotext's settings, if any, over A1111's API defaults) with every
    /// field the request sets; `clip_skip` comes from the server's options.
    pub fn to_request(&self, clip_skip: usize) -> Result<Request, ApiError> {
        let mut p = GenerationParams {
            steps: DEFAULT_STEPS,
            sampler: Sampler::parse(DEFAULT_SAMPLER).expect("a known sampler"),
            clip_skip,
            ..Default::default()
        };
        if let Some(text) = &self.infotext {
            p = Infotext::parse(text).to_params(p).map_err(|e| ApiError::unprocessable(format!("infotext: {e}")))?;
        }
        set(&mut p.prompt, self.prompt.clone());
        set(&mut p.negative_prompt, self.negative_prompt.clone());
        if let Some(name) = self.sampler_name.as_deref().or(self.sampler_index.as_deref()).filter(|n| !n.is_empty()) {
            p.sampler = sampler(name, self.scheduler.as_deref())?;
        } else if let Some(s) = self.scheduler.as_deref() {
            p.sampler.schedule = scheduler(s, p.sampler)?;
        }
        set(&mut p.steps, self.steps);
        set(&mut p.cfg_scale, self.cfg_scale);
        set(&mut p.width, self.width);
        set(&mut p.height, self.height);
        set(&mut p.batch_size, self.batch_size);
        if self.seed.is_some() || self.infotext.is_none() {
            p.seed = fixed_seed(self.seed.unwrap_or(-1));
        }
        let strength = self.subseed_strength.or(p.variation.map(|v| v.strength)).unwrap_or(0.0);
        p.variation = (strength != 0.0).then(|| Variation {
            subseed: match (self.subseed, p.variation) {
                (None, Some(v)) => v.subseed,
                (s, _) => fixed_seed(s.unwrap_or(-1)),
            },
            strength,
        });
        let overrides = self.override_settings.clone().unwrap_or_default();
        if let Some(skip) = overrides.get("CLIP_stop_at_last_layers").and_then(Value::as_f64) {
            p.clip_skip = skip as usize;
        }
        let n_iter = self.n_iter.unwrap_or(1);
        check_bounds(&p, n_iter)?;
        Ok(Request {
            params: p,
            n_iter,
            send_images: self.send_images.unwrap_or(true),
            save_images: self.save_images.unwrap_or(false),
            overrides,
        })
    }
}

impl Txt2ImgRequest {
    pub fn to_request(&self, clip_skip: usize) -> Result<Request, ApiError> {
        let mut r = self.common.to_request(clip_skip)?;
        if self.enable_hr == Some(true) {
            // A1111's "Latent" is bilinear, which is what sdw does; its other latent modes
            // (nearest-exact, bicubic, antialiased) would give another image.
            if let Some(up) = self.hr_upscaler.as_deref().filter(|u| !matches!(*u, "" | "Latent")) {
                return Err(ApiError::unprocessable(format!(
                    "hr_upscaler {up:?}: sdw has only the latent upscaler (\"Latent\")"
                )));
            }
            let mut hr = HiresFix::with_scale(self.hr_scale.unwrap_or(2.0));
            set(&mut hr.steps, self.hr_second_pass_steps);
            set(&mut hr.denoising_strength, self.common.denoising_strength);
            r.params.hires = Some(hr);
        }
        r.params.validate().map_err(|e| ApiError::unprocessable(e.to_string()))?;
        Ok(r)
    }
}

/// img2img's own settings, decoded images aside.
pub struct Img2ImgSettings {
    pub denoising_strength: f32,
    pub resize_mode: ResizeMode,
    pub mask_blur: f32,
    pub fill: InpaintingFill,
    pub only_masked: bool,
    pub padding: u32,
    pub invert_mask: bool,
}

impl Img2ImgRequest {
    pub fn settings(&self) -> Result<Img2ImgSettings, ApiError> {
        let resize_mode = match self.resize_mode.unwrap_or(0) {
            // 3 is "Just resize (latent upscale)": the same stretch, done on pixels here.
            0 | 3 => ResizeMode::JustResize,
            1 => ResizeMode::CropAndResize,
            2 => ResizeMode::ResizeAndFill,
            n => return Err(ApiError::unprocessable(format!("resize_mode must be 0-3, got {n}"))),
        };
        let fill = match self.inpainting_fill.unwrap_or(0) {
            0 => InpaintingFill::Fill,
            1 => InpaintingFill::Original,
            2 => InpaintingFill::LatentNoise,
            3 => InpaintingFill::LatentNothing,
            n => return Err(ApiError::unprocessable(format!("inpainting_fill must be 0-3, got {n}"))),
        };
        let denoising_strength = self.common.denoising_strength.unwrap_or(0.75);
        if !(0.0..=1.0).contains(&denoising_strength) {
            return Err(ApiError::unprocessable(format!(
                "denoising_strength must be between 0 and 1, got {denoising_strength}"
            )));
        }
        Ok(Img2ImgSettings {
            denoising_strength,
            resize_mode,
            mask_blur: self.mask_blur.or(self.mask_blur_x).unwrap_or(4.0),
            fill,
            only_masked: self.inpaint_full_res.unwrap_or(true),
            padding: self.inpaint_full_res_padding.unwrap_or(0),
            invert_mask: self.inpainting_mask_invert.unwrap_or(0) != 0,
        })
    }
}

fn set<T>(field: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *field = v;
    }
}

/// A1111's `get_fixed_seed`: -1 (or any negative) is a random 32-bit seed.
pub fn fixed_seed(seed: i64) -> u64 {
    if seed >= 0 { seed as u64 } else { crate::pipeline::noise::random_seed() }
}

/// `sampler_name` (an A1111 or sdw name, maybe with a schedule: "DPM++ 2M Karras") and
/// `scheduler` ("Karras", "karras", "Automatic", ...). Unlike A1111, which silently
/// falls back to DPM++ 2M, an unknown name is an error: the image would not be the one
/// asked for.
pub fn sampler(name: &str, schedule: Option<&str>) -> Result<Sampler, ApiError> {
    let (kind, named) = parse_sampler(name).map_err(ApiError::unprocessable)?;
    let mut s = Sampler { kind, schedule: named.unwrap_or_else(|| kind.automatic_schedule()) };
    if let Some(label) = schedule.filter(|l| !l.is_empty()) {
        s.schedule = scheduler(label, s)?;
    }
    Ok(s)
}

fn scheduler(label: &str, s: Sampler) -> Result<ScheduleKind, ApiError> {
    ScheduleKind::from_a1111(label, s.kind).map_err(ApiError::unprocessable)
}

fn check_bounds(p: &GenerationParams, n_iter: usize) -> Result<(), ApiError> {
    let too = |what: String| Err(ApiError::too_large(what));
    if p.width > MAX_SIDE || p.height > MAX_SIDE {
        return too(format!("{}x{} is larger than the server's {MAX_SIDE}x{MAX_SIDE}", p.width, p.height));
    }
    if p.steps > MAX_STEPS {
        return too(format!("{} steps is more than the server's {MAX_STEPS}", p.steps));
    }
    if n_iter == 0 || p.batch_size * n_iter > MAX_IMAGES {
        return Err(ApiError::unprocessable(format!(
            "batch_size x n_iter must be between 1 and {MAX_IMAGES} (got {} x {n_iter})",
            p.batch_size
        )));
    }
    p.validate().map_err(|e| ApiError::unprocessable(e.to_string()))
}

/// `Processed.js()`: what A1111 reports about a finished job.
pub fn info_json(p: &GenerationParams, all: &Finished, model: &ModelInfo) -> String {
    let prompts = vec![p.prompt.clone(); all.seeds.len()];
    let negatives = vec![p.negative_prompt.clone(); all.seeds.len()];
    let first_infotext = all.infotexts.first().map(|t| Infotext::parse(t)).unwrap_or_default();
    let core = [
        "Steps",
        "Sampler",
        "CFG scale",
        "Seed",
        "Size",
        "Model hash",
        "Model",
        "VAE",
        "Variation seed",
        "Variation seed strength",
        "Clip skip",
        "RNG",
        "Version",
    ];
    let extra: Map<String, Value> = first_infotext
        .params
        .iter()
        .filter(|(k, _)| !core.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.parse::<f64>().map_or_else(|_| Value::from(v.clone()), Value::from)))
        .collect();
    let info = serde_json::json!({
        "prompt": p.prompt,
        "all_prompts": prompts,
        "negative_prompt": p.negative_prompt,
        "all_negative_prompts": negatives,
        "seed": all.seeds.first(),
        "all_seeds": all.seeds,
        "subseed": all.subseeds.first(),
        "all_subseeds": all.subseeds,
        "subseed_strength": p.variation.map_or(0.0, |v| v.strength),
        "width": p.hires_size().map_or(p.width, |s| s.0),
        "height": p.hires_size().map_or(p.height, |s| s.1),
        "sampler_name": p.sampler.a1111_name(),
        "cfg_scale": p.cfg_scale,
        "steps": p.steps,
        "batch_size": p.batch_size,
        "restore_faces": false,
        "face_restoration_model": null,
        "sd_model_name": model.name,
        "sd_model_hash": model.hash,
        "sd_vae_name": model.vae,
        "sd_vae_hash": null,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": all.denoising_strength,
        "extra_generation_params": extra,
        "index_of_first_image": 0,
        "infotexts": all.infotexts,
        "styles": [],
        "job_timestamp": all.job_timestamp,
        "clip_skip": p.clip_skip,
        "is_using_inpainting_conditioning": model.inpainting,
        "version": format!("sdw {}", env!("CARGO_PKG_VERSION")),
    });
    info.to_string()
}

/// What a finished job made, for [`info_json`].
#[derive(Default)]
pub struct Finished {
    pub seeds: Vec<u64>,
    pub subseeds: Vec<u64>,
    pub infotexts: Vec<String>,
    pub denoising_strength: Option<f32>,
    pub job_timestamp: String,
}

/// The loaded model as `info` names it.
#[derive(Clone, Debug, Default)]
pub struct ModelInfo {
    pub name: String,
    pub hash: Option<String>,
    pub vae: Option<String>,
    pub inpainting: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Txt2ImgRequest {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a1111_defaults_and_unknown_fields() {
        let r = parse(r#"{"prompt": "a cat", "seed": 5, "alwayson_scripts": {}, "restore_faces": false}"#);
        let req = r.to_request(1).unwrap();
        let p = &req.params;
        assert_eq!((p.steps, p.cfg_scale, p.width, p.height, p.seed), (50, 7.0, 512, 512, 5));
        assert_eq!(p.sampler, Sampler::parse("euler").unwrap());
        assert!(req.send_images && !req.save_images && req.n_iter == 1);
        let p = parse(r#"{"seed": -1, "steps": null}"#).to_request(2).unwrap().params;
        assert!(p.seed < 4_294_967_294 && p.steps == 50 && p.clip_skip == 2);
    }

    #[test]
    fn sampler_names_with_schedules() {
        let s = |name: &str, sch: Option<&str>| sampler(name, sch).unwrap();
        assert_eq!(s("DPM++ 2M Karras", None), Sampler::parse("dpmpp_2m_karras").unwrap());
        assert_eq!(s("DPM++ 2M", None), Sampler::parse("dpmpp_2m_karras").unwrap());
        assert_eq!(s("DPM++ 2M", Some("Uniform")), Sampler::parse("dpmpp_2m").unwrap());
        assert_eq!(s("Euler a", Some("karras")), Sampler::parse("euler_a_karras").unwrap());
        assert_eq!(s("Euler a", Some("Automatic")), Sampler::parse("euler_a").unwrap());
        assert_eq!(sampler("DPM++ SDE", None).unwrap_err().status.as_u16(), 422);
        assert_eq!(sampler("Euler", Some("Beta")).unwrap_err().status.as_u16(), 422);
    }

    #[test]
    fn hires_and_bounds() {
        let r = parse(r#"{"enable_hr": true, "hr_scale": 1.5, "denoising_strength": 0.4, "hr_upscaler": "Latent"}"#);
        let hr = r.to_request(1).unwrap().params.hires.unwrap();
        assert_eq!((hr.scale, hr.steps, hr.denoising_strength), (1.5, 0, 0.4));
        let bad = parse(r#"{"enable_hr": true, "hr_upscaler": "R-ESRGAN 4x+"}"#).to_request(1).unwrap_err();
        assert_eq!(bad.status.as_u16(), 422);
        let bad = parse(r#"{"enable_hr": true, "hr_upscaler": "Latent (nearest-exact)"}"#).to_request(1).unwrap_err();
        assert_eq!(bad.status.as_u16(), 422);
        assert_eq!(parse(r#"{"width": 8192}"#).to_request(1).unwrap_err().status.as_u16(), 413);
        assert_eq!(parse(r#"{"width": 500}"#).to_request(1).unwrap_err().status.as_u16(), 422);
        assert_eq!(parse(r#"{"n_iter": 0}"#).to_request(1).unwrap_err().status.as_u16(), 422);
    }

    #[test]
    fn infotext_fills_what_the_request_leaves_out() {
        let r = parse(
            r#"{"infotext": "a dog\nNegative prompt: ugly\nSteps: 12, Sampler: Heun, CFG scale: 4, Seed: 9, Size: 64x128", "cfg_scale": 6}"#,
        );
        let p = r.to_request(1).unwrap().params;
        assert_eq!((p.prompt.as_str(), p.negative_prompt.as_str()), ("a dog", "ugly"));
        assert_eq!((p.steps, p.cfg_scale, p.seed, p.width, p.height), (12, 6.0, 9, 64, 128));
        assert_eq!(p.sampler.kind, Sampler::parse("heun").unwrap().kind);
    }
}
