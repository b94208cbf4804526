//! What every generation returns: the latents, the decoded pixels, one infotext per image,
//! and how the final 8-bit images are composed from them (inpainting pastes the original
//! back).

use burn::tensor::DType;
use image::{GrayImage, RgbImage};

use crate::device::Dtypes;
use crate::output;
use crate::weights::HostTensor;

use super::image_input::{self, ResizeMode};

pub struct Generated {
    /// Final latents `[B, 4, h, w]` (scaled, as the sampler sees them).
    pub latents: HostTensor,
    /// Decoded pixels `[B, 3, H, W]` in about [-1, 1].
    pub image: HostTensor,
    /// One A1111 infotext per image (each with its own seed).
    pub infotexts: Vec<String>,
    /// How [`Self::rgb8`] turns the decoded pixels into the final image.
    pub composite: Composite,
}

/// The step from decoded pixels to the image the user gets.
#[derive(Clone, Debug, Default)]
pub enum Composite {
    /// The decoded pixels as they are.
    #[default]
    None,
    /// Inpainting: the original pasted back outside the mask (A1111's overlay), its alpha
    /// the inverted blurred mask, so where the mask is 0 the original pixels come back exactly.
    Overlay { original: RgbImage, mask: GrayImage },
    /// Inpainting "only masked": the generated image scaled into `region` (x, y, width,
    /// height) of the original, then the overlay with the mask at the original's size.
    PasteInto { original: RgbImage, mask: GrayImage, region: (u32, u32, u32, u32) },
}

impl Generated {
    pub fn len(&self) -> usize {
        self.image.shape[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first image that decoded to NaN or pure black (a VAE or UNet overflow, A1111's
    /// NaN check): such an image must be an error with a remedy, never a saved black image.
    pub fn overflowed(&self) -> Option<usize> {
        let per_image = self.image.data.len() / self.len().max(1);
        self.image
            .data
            .chunks(per_image.max(1))
            .position(|img| img.iter().any(|v| !v.is_finite()) || img.iter().all(|&v| v <= -1.0))
    }

    /// What went wrong with image `i`, which [`Self::overflowed`] computing in `dtypes`, and
    /// what to try: NaN latents come from CLIP or the UNet (in f16 an overflow, in f32 a broken
    /// checkpoint), finite ones from the VAE (an f16 VAE that overflowed was redone in f32).
    pub fn overflow_remedy(&self, i: usize, dtypes: Dtypes) -> &'static str {
        let per_image = self.latents.data.len() / self.len().max(1);
        let latents = self.latents.data.chunks(per_image.max(1)).nth(i).unwrap_or_default();
        match (latents.iter().all(|v| v.is_finite()), dtypes.activations == DType::F16) {
            (false, true) => "CLIP or the UNet overflowed in f16. Try --precision f32",
            (false, false) => "the model computed NaN: its checkpoint may be broken. Try another model",
            (true, _) => {
                "the VAE failed. Try another VAE (--vae, or the server's sd_vae option; e.g. \
                 vae-ft-mse-840000-ema-pruned.safetensors), or --device cpu"
            }
        }
    }

    /// Image `i` as 8-bit RGB (A1111's truncation), composed as [`Composite`] says.
    pub fn rgb8(&self, i: usize) -> output::RgbImage {
        let [_, _, h, w] = self.image.shape[..] else { panic!("images are [B, 3, H, W]") };
        let img = output::to_rgb8(&self.image.data[i * 3 * h * w..(i + 1) * 3 * h * w], h, w);
        match &self.composite {
            Composite::None => img,
            Composite::Overlay { original, mask } => overlay(original, mask, img),
            Composite::PasteInto { original, mask, region: (x, y, cw, ch) } => {
                let generated = RgbImage::from_raw(w as u32, h as u32, img.pixels).expect("to_rgb8 gives w*h*3 bytes");
                let patch = image_input::resize(&generated, ResizeMode::CropAndResize, *cw, *ch);
                let mut full = original.clone();
                image::imageops::replace(&mut full, &patch, *x as i64, *y as i64);
                let (fw, fh) = full.dimensions();
                let img = output::RgbImage { width: fw as usize, height: fh as usize, pixels: full.into_raw() };
                overlay(original, mask, img)
            }
        }
    }
}

/// `original` over `img` with alpha `255 - mask`, rounded as PIL's `alpha_composite`.
fn overlay(original: &RgbImage, mask: &GrayImage, mut img: output::RgbImage) -> output::RgbImage {
    let orig = original.as_raw();
    for (i, m) in mask.pixels().enumerate() {
        let a = m[0] as u32;
        for c in 0..3 {
            let k = 3 * i + c;
            let (o, g) = (orig[k] as u32, img.pixels[k] as u32);
            img.pixels[k] = ((o * (255 - a) + g * a + 127) / 255) as u8;
        }
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two images: the first with NaN latents (CLIP or the UNet), the second with finite
    /// latents decoded to NaN (the VAE).
    fn two_broken() -> Generated {
        let latents = HostTensor::new(vec![2, 4, 1, 1], [vec![f32::NAN; 4], vec![0.5; 4]].concat());
        let image = HostTensor::new(vec![2, 3, 8, 8], vec![f32::NAN; 2 * 3 * 64]);
        Generated { latents, image, infotexts: vec![String::new(); 2], composite: Composite::None }
    }

    #[test]
    fn a_nan_image_names_the_network_to_blame() {
        let g = two_broken();
        assert_eq!(g.overflowed(), Some(0));
        assert!(g.overflow_remedy(0, Dtypes::F16).contains("--precision f32"));
        assert!(g.overflow_remedy(0, Dtypes::F32).contains("checkpoint"));
        for dtypes in [Dtypes::F16, Dtypes::F32] {
            assert!(g.overflow_remedy(1, dtypes).contains("--vae"));
        }
    }
}
