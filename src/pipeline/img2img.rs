//! img2img and inpainting, as A1111 does them: the init image's VAE mean (x scaling
//! factor) noised to where the denoising strength cuts the schedule; with a mask, the
//! unmasked latent is restored after every step and the unmasked pixels pasted back.

use burn::tensor::Tensor;
use image::{GrayImage, RgbImage};

use crate::model::layers::to_device;
use crate::output::fmt_num;
use crate::sampling::{Progress, Start};
use crate::weights::HostTensor;

use super::generate::Pass;
use super::generated::{Composite, Generated};
use super::image_input;
use super::params::{GenerationParams, check_strength};
use super::{PipelineError, StableDiffusion};

/// What the masked area starts from (A1111's "Masked content").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum InpaintingFill {
    /// The init image with the masked area filled from the colours around it.
    Fill,
    /// The init image's latent.
    #[default]
    Original,
    /// Fresh noise.
    LatentNoise,
    /// Zeros.
    LatentNothing,
}

impl InpaintingFill {
    fn a1111_code(self) -> u8 {
        match self {
            InpaintingFill::Fill => 0,
            InpaintingFill::Original => 1,
            InpaintingFill::LatentNoise => 2,
            InpaintingFill::LatentNothing => 3,
        }
    }
}

/// The input of img2img: an image already at the generation size.
pub struct InitImage {
    pub image: RgbImage,
    pub denoising_strength: f32,
    pub mask: Option<Mask>,
}

/// An inpainting mask at the generation size: white = repaint.
pub struct Mask {
    pub mask: GrayImage,
    /// Gaussian blur radius in pixels (A1111 "Mask blur", default 4).
    pub blur: f32,
    pub fill: InpaintingFill,
}

/// `--inpaint-full-res` as the infotext records it: the user's mask blur and the padding.
#[derive(Clone, Copy)]
struct OnlyMasked {
    blur: f32,
    padding: u32,
}

impl StableDiffusion {
    pub fn img2img(
        &self,
        p: &GenerationParams,
        init: &InitImage,
        progress: &mut dyn Progress,
    ) -> Result<Generated, PipelineError> {
        self.img2img_pass(p, init, None, progress)
    }

    fn img2img_pass(
        &self,
        p: &GenerationParams,
        init: &InitImage,
        only_masked: Option<OnlyMasked>,
        progress: &mut dyn Progress,
    ) -> Result<Generated, PipelineError> {
        self.check(p)?;
        check_strength("--denoising-strength", init.denoising_strength)?;
        if init.image.dimensions() != (p.width as u32, p.height as u32) {
            return Err(PipelineError::Invalid(format!(
                "the init image is {}x{}, the generation {}x{}: resize it first",
                init.image.width(),
                init.image.height(),
                p.width,
                p.height
            )));
        }
        if init.mask.is_some() && p.sampler.kind.k_sampler().is_none() {
            return Err(PipelineError::Invalid(
                "inpainting needs a k-diffusion sampler (not ddim), e.g. euler_a".into(),
            ));
        }
        let b = p.batch_size;
        let shape = [b, 4, p.height / 8, p.width / 8];
        let blurred = init.mask.as_ref().map(|m| image_input::blur_mask(&m.mask, m.blur));
        let pixels = match (&init.mask, &blurred) {
            (Some(m), Some(blurred)) if m.fill == InpaintingFill::Fill => {
                image_input::to_tensor(&image_input::fill_masked(&init.image, blurred))
            }
            _ => image_input::to_tensor(&init.image),
        };
        let latent1 = self.encode_mean(&pixels);
        let mut init_latent: Vec<f32> = latent1.data.repeat(b);
        let conds = self.conditioning(p, p.steps, None)?;
        let (noise, mut rng) = self.initial_noise(p, shape);

        // Keep mask at latent size: 1 where the init latent stays (A1111's `self.mask`).
        let keep: Option<Vec<f32>> = blurred.as_ref().map(|m| latent_keep_mask(m, shape[2], shape[3]).repeat(b * 4));
        if let (Some(m), Some(keep)) = (&init.mask, &keep) {
            match m.fill {
                InpaintingFill::Fill | InpaintingFill::Original => {}
                InpaintingFill::LatentNoise => {
                    for ((x, k), n) in init_latent.iter_mut().zip(keep).zip(&noise) {
                        *x = *x * k + n * (1.0 - k);
                    }
                }
                InpaintingFill::LatentNothing => init_latent.iter_mut().zip(keep).for_each(|(x, k)| *x *= k),
            }
        }
        let image_cond = match (self.is_inpainting(), &init.mask) {
            (false, _) => None,
            (true, Some(m)) => Some(self.masked_image_cond(&pixels, &m.mask, shape)),
            // Everything masked: the masked image is all zeros, i.e. the blank conditioning.
            (true, None) => Some(self.blank_image_cond(shape)),
        };
        let start = Start::Image { latent: &init_latent, strength: init.denoising_strength };
        let keep_pair = keep.as_ref().map(|k| (init_latent.as_slice(), k.as_slice()));
        let pass = Pass { shape, steps: p.steps, start, keep: keep_pair, image_cond };
        let latents = self.run_pass(p, &conds, pass, noise, &mut rng, progress);
        let latents = HostTensor::new(shape.to_vec(), latents);
        let image = self.decode(&latents)?;
        let composite = match blurred {
            Some(mask) => Composite::Overlay { original: init.image.clone(), mask },
            None => Composite::None,
        };
        let mut extra = vec![("Denoising strength", fmt_num(init.denoising_strength))];
        if let Some(m) = &init.mask {
            extra.push(("Mask blur", fmt_num(only_masked.map_or(m.blur, |o| o.blur))));
            if let Some(o) = only_masked {
                extra.push(("Inpaint area", "Only masked".into()));
                extra.push(("Masked area padding", o.padding.to_string()));
            }
            extra.push(("Masked content", m.fill.a1111_code().to_string()));
        }
        Ok(Generated { latents, image, infotexts: self.infotexts(p, &extra), composite })
    }

    /// Does the UNet take the 5 extra channels of an inpainting model?
    pub fn is_inpainting(&self) -> bool {
        self.unet.config().in_channels == 9
    }

    /// An inpainting model's extra input when nothing is masked (A1111's txt2img
    /// conditioning): mask 1 everywhere, the latent of a mid-grey image.
    pub(super) fn blank_image_cond(&self, shape: [usize; 4]) -> Tensor<4> {
        let [b, _, h, w] = shape;
        let grey = HostTensor::new(vec![1, 3, h * 8, w * 8], vec![0.0; 3 * h * w * 64]);
        let lat = self.encode_mean(&grey);
        let mut data = vec![1.0; h * w];
        data.extend(lat.data);
        to_device(data.repeat(b), [b, 5, h, w], &self.compute.device)
    }

    /// An inpainting model's extra input: the rounded mask at latent size and the latent of
    /// the image with the masked area blanked (A1111's `inpainting_image_conditioning`).
    fn masked_image_cond(&self, pixels: &HostTensor, mask: &GrayImage, shape: [usize; 4]) -> Tensor<4> {
        let [b, _, h, w] = shape;
        let (pw, ph) = mask.dimensions();
        let round = |v: u8| if v as f32 / 255.0 >= 0.5 { 1.0 } else { 0.0 };
        let plane = (pw * ph) as usize;
        let mut masked = pixels.clone();
        for (i, px) in mask.pixels().enumerate() {
            let keep = 1.0 - round(px[0]);
            for c in 0..3 {
                masked.data[c * plane + i] *= keep;
            }
        }
        let lat = self.encode_mean(&masked);
        // Nearest-neighbour to latent size, as F.interpolate's default.
        let mut data: Vec<f32> = (0..h * w)
            .map(|i| {
                let (y, x) = (i / w, i % w);
                round(mask.get_pixel((x * pw as usize / w) as u32, (y * ph as usize / h) as u32)[0])
            })
            .collect();
        data.extend(lat.data);
        to_device(data.repeat(b), [b, 5, h, w], &self.compute.device)
    }
}

/// A1111's latent mask: the blurred mask resized to latent size (bicubic, PIL's default),
/// rounded to 0/1, inverted to "keep".
fn latent_keep_mask(mask: &GrayImage, h: usize, w: usize) -> Vec<f32> {
    let small = image::imageops::resize(mask, w as u32, h as u32, image::imageops::FilterType::CatmullRom);
    small.pixels().map(|p| 1.0 - (p[0] as f32 / 255.0).round()).collect()
}

/// `--inpaint-full-res` (A1111's "Inpaint area: Only masked"): the masked region plus
/// `padding`, grown to the generation's aspect ratio, is generated at the full
/// `--width` x `--height`, scaled back and pasted into the original image.
impl StableDiffusion {
    pub fn inpaint_full_res(
        &self,
        p: &GenerationParams,
        image: &RgbImage,
        mask: &Mask,
        denoising_strength: f32,
        padding: u32,
        progress: &mut dyn Progress,
    ) -> Result<Generated, PipelineError> {
        if mask.mask.dimensions() != image.dimensions() {
            return Err(PipelineError::Invalid(format!(
                "the mask is {}x{}, the image {}x{}: they must be the same size",
                mask.mask.width(),
                mask.mask.height(),
                image.width(),
                image.height()
            )));
        }
        let blurred = image_input::blur_mask(&mask.mask, mask.blur);
        let region = crop_region(&blurred, padding)
            .ok_or_else(|| PipelineError::Invalid("the mask is empty: nothing to repaint".into()))?;
        let (x1, y1, x2, y2) = expand_crop_region(region, p.width, p.height, image.width(), image.height());
        let (cw, ch) = (x2 - x1, y2 - y1);
        let (w, h) = (p.width as u32, p.height as u32);
        let fill = image_input::ResizeMode::ResizeAndFill;
        let crop_mask =
            image_input::resize(&image::imageops::crop_imm(&blurred, x1, y1, cw, ch).to_image(), fill, w, h);
        let crop_image = image_input::resize(&image::imageops::crop_imm(image, x1, y1, cw, ch).to_image(), fill, w, h);
        let init = InitImage {
            image: crop_image,
            denoising_strength,
            mask: Some(Mask { mask: crop_mask, blur: 0.0, fill: mask.fill }),
        };
        let out = self.img2img_pass(p, &init, Some(OnlyMasked { blur: mask.blur, padding }), progress)?;
        let composite = Composite::PasteInto { original: image.clone(), mask: blurred, region: (x1, y1, cw, ch) };
        Ok(Generated { composite, ..out })
    }
}

/// The bounding box of the mask's non-zero pixels grown by `pad`, within the image
/// (A1111's `get_crop_region_v2`): `(x1, y1, x2, y2)`, exclusive ends.
fn crop_region(mask: &GrayImage, pad: u32) -> Option<(u32, u32, u32, u32)> {
    let (w, h) = mask.dimensions();
    let mut bbox: Option<(u32, u32, u32, u32)> = None;
    for (x, y, p) in mask.enumerate_pixels() {
        if p[0] > 0 {
            bbox = Some(match bbox {
                None => (x, y, x + 1, y + 1),
                Some((a, b, c, d)) => (a.min(x), b.min(y), c.max(x + 1), d.max(y + 1)),
            });
        }
    }
    let (x1, y1, x2, y2) = bbox?;
    Some((x1.saturating_sub(pad), y1.saturating_sub(pad), (x2 + pad).min(w), (y2 + pad).min(h)))
}

/// Grows a crop region to the generation's aspect ratio, staying inside the image
/// (A1111's `expand_crop_region`).
fn expand_crop_region(region: (u32, u32, u32, u32), pw: usize, ph: usize, iw: u32, ih: u32) -> (u32, u32, u32, u32) {
    let (mut x1, mut y1, mut x2, mut y2) = (region.0 as i64, region.1 as i64, region.2 as i64, region.3 as i64);
    let ratio_crop = (x2 - x1) as f64 / (y2 - y1) as f64;
    let ratio = pw as f64 / ph as f64;
    let grow = |a: &mut i64, b: &mut i64, desired: f64, limit: i64| {
        let diff = (desired - (*b - *a) as f64) as i64;
        *a -= diff.div_euclid(2);
        *b += diff - diff.div_euclid(2);
        if *b >= limit {
            let d = *b - limit;
            *b -= d;
            *a -= d;
        }
        if *a < 0 {
            *b -= *a;
            *a = 0;
        }
        *b = (*b).min(limit);
    };
    if ratio_crop > ratio {
        grow(&mut y1, &mut y2, (x2 - x1) as f64 / ratio, ih as i64);
    } else {
        grow(&mut x1, &mut x2, (y2 - y1) as f64 * ratio, iw as i64);
    }
    (x1 as u32, y1 as u32, x2 as u32, y2 as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_region_grows_to_the_aspect_ratio() {
        let mask = GrayImage::from_fn(100, 80, |x, y| {
            image::Luma([if (40..50).contains(&x) && (30..36).contains(&y) { 255 } else { 0 }])
        });
        let r = crop_region(&mask, 4).unwrap();
        assert_eq!(r, (36, 26, 54, 40));
        let (x1, y1, x2, y2) = expand_crop_region(r, 64, 64, 100, 80);
        assert_eq!(x2 - x1, y2 - y1);
        assert!(x1 <= 36 && x2 >= 54 && y1 <= 26 && y2 >= 40);
        assert!(crop_region(&GrayImage::new(8, 8), 4).is_none());
    }
}
