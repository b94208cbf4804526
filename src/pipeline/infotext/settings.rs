//! Generation settings to an infotext and back: the fields A1111 writes, in its order,
//! and the ones `--from-png`, PNG Info and the API read.

use crate::output::fmt_num;
use crate::sampling::{Sampler, ScheduleKind, parse_sampler};

use super::Infotext;
use crate::pipeline::{GenerationParams, HiresFix, Variation};

/// What an infotext says about the model rather than the generation.
#[derive(Clone, Debug, Default)]
pub struct ModelFields {
    /// The checkpoint's name as A1111 shows it (file stem or folder name).
    pub name: String,
    /// A1111's short "Model hash" (10 hex digits).
    pub hash: Option<String>,
    /// A separate VAE's file name.
    pub vae: Option<String>,
    /// A1111's `TI hashes` list, `name: shorthash, ...`.
    pub ti_hashes: Option<String>,
}

impl Infotext {
    /// The infotext of image `index` of a batch generated with `p`; `extra` fields (img2img's
    /// denoising strength and mask settings) go after the model and variation fields.
    pub fn of_generation(p: &GenerationParams, index: usize, model: &ModelFields, extra: &[(&str, String)]) -> Self {
        let mut f: Vec<(&str, String)> =
            vec![("Steps", p.steps.to_string()), ("Sampler", p.sampler.a1111_name().into())];
        if let Some(s) = p.sampler.schedule_label() {
            f.push(("Schedule type", s.into()));
        }
        f.push(("CFG scale", fmt_num(p.cfg_scale)));
        f.push(("Seed", p.seeds()[index].to_string()));
        f.push(("Size", format!("{}x{}", p.width, p.height)));
        if let Some(hash) = &model.hash {
            f.push(("Model hash", hash.clone()));
        }
        f.push(("Model", model.name.clone()));
        if let Some(vae) = &model.vae {
            f.push(("VAE", vae.clone()));
        }
        if let Some((subseeds, strength)) = p.subseeds() {
            f.push(("Variation seed", subseeds[index].to_string()));
            f.push(("Variation seed strength", fmt_num(strength)));
        }
        f.extend(extra.iter().cloned());
        if let Some(hr) = p.hires {
            f.push(("Denoising strength", fmt_num(hr.denoising_strength)));
            f.push(("Hires upscale", fmt_num(hr.scale)));
            if hr.steps > 0 {
                f.push(("Hires steps", hr.steps.to_string()));
            }
            f.push(("Hires upscaler", "Latent".into()));
        }
        if p.clip_skip > 1 {
            f.push(("Clip skip", p.clip_skip.to_string()));
        }
        if !p.lora_hashes.is_empty() {
            // A1111 drops `:` and `,` from names so the list stays parseable.
            let list: Vec<String> =
                p.lora_hashes.iter().map(|(n, h)| format!("{}: {h}", n.replace([':', ','], ""))).collect();
            f.push(("Lora hashes", list.join(", ")));
        }
        if let Some(ti) = &model.ti_hashes {
            f.push(("TI hashes", ti.clone()));
        }
        // Our noise is torch's CUDA Philox stream: A1111 reproduces it with its "NV" source.
        f.push(("RNG", "NV".into()));
        f.push(("Version", format!("sdw {}", env!("CARGO_PKG_VERSION"))));
        Infotext {
            prompt: p.prompt.clone(),
            negative_prompt: p.negative_prompt.clone(),
            params: f.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        }
    }

    /// `base` with every setting this infotext records (A1111's "send to txt2img"): the
    /// prompts, steps, sampler and schedule, CFG scale, seed, size, clip skip, variation
    /// and hires fix. What it leaves out keeps `base`'s value, except the schedule: A1111
    /// 1.9+ leaves "Automatic" out, so a sampler without one gets its automatic schedule.
    pub fn to_params(&self, base: GenerationParams) -> Result<GenerationParams, String> {
        let mut p = base;
        p.prompt = self.prompt.clone();
        p.negative_prompt = self.negative_prompt.clone();
        p.sampler = self.sampler(p.sampler)?;
        if let Some(v) = self.get_parsed("Steps")? {
            p.steps = v;
        }
        if let Some(v) = self.get_parsed("CFG scale")? {
            p.cfg_scale = v;
        }
        if let Some(v) = self.get_parsed("Seed")? {
            p.seed = v;
        }
        if let Some((w, h)) = self.size()? {
            (p.width, p.height) = (w, h);
        }
        if let Some(v) = self.get_parsed("Clip skip")? {
            p.clip_skip = v;
        }
        p.variation = self.variation()?;
        if let Some(scale) = self.get_parsed("Hires upscale")? {
            let mut hr = HiresFix::with_scale(scale);
            if let Some(v) = self.get_parsed("Hires steps")? {
                hr.steps = v;
            }
            if let Some(v) = self.get_parsed("Denoising strength")? {
                hr.denoising_strength = v;
            }
            p.hires = Some(hr);
        }
        Ok(p)
    }

    fn sampler(&self, base: Sampler) -> Result<Sampler, String> {
        let (kind, named_schedule) = match self.get("Sampler") {
            Some(name) => parse_sampler(name)?,
            None => (base.kind, None),
        };
        let schedule = match (self.get("Schedule type"), named_schedule) {
            (Some(label), _) => ScheduleKind::from_a1111(label, kind)?,
            // An older A1111 name with the schedule in it ("DPM++ 2M Karras").
            (None, Some(s)) => s,
            (None, None) => kind.automatic_schedule(),
        };
        Ok(Sampler { kind, schedule })
    }

    fn variation(&self) -> Result<Option<Variation>, String> {
        let strength: f32 = self.get_parsed("Variation seed strength")?.unwrap_or(0.0);
        if strength == 0.0 {
            return Ok(None);
        }
        let subseed = self
            .get_parsed("Variation seed")?
            .ok_or("the infotext has a \"Variation seed strength\" but no \"Variation seed\"")?;
        Ok(Some(Variation { subseed, strength }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> ModelFields {
        ModelFields {
            name: "weird: name, \"quoted\"".into(),
            hash: Some("0123456789".into()),
            vae: Some("vae-ft-mse.safetensors".into()),
            ti_hashes: Some("emb: 0123456789ab".into()),
        }
    }

    /// Every setting the infotext records survives writing and reading it back.
    #[test]
    fn write_then_read_round_trip() {
        let samplers = ["euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lms_exponential", "heun", "ddim", "euler_karras"];
        for (i, name) in samplers.into_iter().enumerate() {
            let p = GenerationParams {
                prompt: "a cat, <lora:me:0.8>\nsecond line".into(),
                negative_prompt: if i % 2 == 0 { "blurry, ugly".into() } else { String::new() },
                sampler: Sampler::parse(name).unwrap(),
                steps: 10 + i,
                cfg_scale: 5.5,
                seed: 4040056495 + i as u64,
                width: 512,
                height: 768,
                clip_skip: 1 + i % 2,
                batch_size: 3,
                variation: (i % 3 == 0).then_some(Variation { subseed: 77, strength: 0.25 }),
                hires: (i % 2 == 1).then_some(HiresFix { scale: 1.5, steps: i, denoising_strength: 0.55 }),
                lora_hashes: vec![("me".into(), "0123456789ab".into())],
            };
            for index in 0..p.batch_size {
                let text = Infotext::of_generation(&p, index, &model(), &[]).to_string();
                let it = Infotext::parse(&text);
                assert_eq!(it.get("Model"), Some(model().name.as_str()), "{text}");
                assert_eq!(it.get("Lora hashes"), Some("me: 0123456789ab"));
                let back = it.to_params(GenerationParams { batch_size: 3, ..Default::default() }).unwrap();
                let mut want = GenerationParams { lora_hashes: Vec::new(), seed: p.seeds()[index], ..p.clone() };
                if let Some(v) = &mut want.variation {
                    v.subseed += index as u64;
                }
                assert_eq!(back, want, "{name} image {index}: {text}");
            }
        }
    }

    #[test]
    fn what_the_infotext_leaves_out_keeps_the_base() {
        let base = GenerationParams { steps: 33, width: 640, height: 448, ..Default::default() };
        let p = Infotext::parse("a dog\nSampler: DPM++ 2M, Seed: 5, CFG scale: 4").to_params(base).unwrap();
        assert_eq!((p.steps, p.width, p.height, p.seed, p.cfg_scale), (33, 640, 448, 5, 4.0));
        // A1111 1.9+ leaves "Schedule type: Automatic" out: DPM++ 2M's automatic is Karras.
        assert_eq!(p.sampler, Sampler::parse("dpmpp_2m_karras").unwrap());
        // Older A1111 names carry the schedule.
        let it = Infotext::parse("x\nSampler: LMS Karras, Seed: 5, Steps: 3");
        assert_eq!(it.to_params(GenerationParams::default()).unwrap().sampler, Sampler::parse("lms_karras").unwrap());
    }

    #[test]
    fn bad_settings_are_errors() {
        let bad = |text: &str| Infotext::parse(text).to_params(GenerationParams::default()).unwrap_err();
        assert!(bad("x\nSteps: 2o, Seed: 1, Size: 8x8").contains("Steps"));
        assert!(bad("x\nSampler: Frobnicate, Seed: 1, Steps: 3").contains("Frobnicate"));
        assert!(bad("x\nSampler: Euler, Schedule type: Polyexponential, Steps: 3").contains("Polyexponential"));
        assert!(bad("x\nVariation seed strength: 0.5, Seed: 1, Steps: 3").contains("Variation seed"));
    }
}
