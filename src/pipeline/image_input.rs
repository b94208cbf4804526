//! Images and masks users pass in, brought to the generation size as A1111 does.

use std::path::Path;

use image::imageops::{self, FilterType};
use image::{GrayImage, RgbImage};

use crate::weights::HostTensor;

use super::PipelineError;

/// How an input image of another size is fitted (A1111's "Resize mode").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ResizeMode {
    /// Stretch to the target size.
    #[default]
    JustResize,
    /// Scale to cover the target, then cut the overflow (centred).
    CropAndResize,
    /// Scale to fit inside the target, then fill the borders with the stretched edges.
    ResizeAndFill,
}

impl ResizeMode {
    pub fn a1111_name(self) -> &'static str {
        match self {
            ResizeMode::JustResize => "Just resize",
            ResizeMode::CropAndResize => "Crop and resize",
            ResizeMode::ResizeAndFill => "Resize and fill",
        }
    }
}

pub fn open_rgb(path: &Path) -> Result<RgbImage, PipelineError> {
    let img = image::open(path)
        .map_err(|e| PipelineError::Invalid(format!("{}: cannot read the image: {e}", path.display())))?;
    Ok(img.to_rgb8())
}

pub fn open_mask(path: &Path) -> Result<GrayImage, PipelineError> {
    let img = image::open(path)
        .map_err(|e| PipelineError::Invalid(format!("{}: cannot read the mask: {e}", path.display())))?;
    Ok(img.to_luma8())
}

/// The masked area (white) filled with the colours around it (A1111's `masking.fill`,
/// "Masked content: fill"): the unmasked pixels blurred at falling radii, each blur
/// composited over the last, so far areas get the average colour and near ones the
/// neighbouring colours. Blurs are of premultiplied colour, as PIL's "RGBa" mode.
pub fn fill_masked(image: &RgbImage, mask: &GrayImage) -> RgbImage {
    let (w, h) = image.dimensions();
    let premultiplied = image::Rgba32FImage::from_fn(w, h, |x, y| {
        // In 0..1: the image crate's f32 pixels are clamped to that range.
        let a = 1.0 - mask.get_pixel(x, y)[0] as f32 / 255.0;
        let p = image.get_pixel(x, y).0.map(|c| c as f32 / 255.0 * a);
        image::Rgba([p[0], p[1], p[2], a])
    });
    let mut acc = vec![[0f32; 4]; (w * h) as usize];
    for (radius, repeats) in [(256.0, 1), (64.0, 1), (16.0, 2), (4.0, 4), (2.0, 2), (0.0, 1)] {
        let blurred = if radius > 0.0 { imageops::fast_blur(&premultiplied, radius) } else { premultiplied.clone() };
        for _ in 0..repeats {
            for (dst, src) in acc.iter_mut().zip(blurred.pixels()) {
                // Source-over in premultiplied form: out = src + dst * (1 - src_alpha).
                let keep = 1.0 - src[3].clamp(0.0, 1.0);
                for c in 0..4 {
                    dst[c] = src[c].max(0.0) + dst[c] * keep;
                }
            }
        }
    }
    RgbImage::from_fn(w, h, |x, y| {
        let p = acc[(y * w + x) as usize];
        let rgb = |c: f32| if p[3] > 0.0 { (c / p[3] * 255.0).round().clamp(0.0, 255.0) as u8 } else { 0 };
        image::Rgb([rgb(p[0]), rgb(p[1]), rgb(p[2])])
    })
}

/// `img` fitted to `width` x `height` (Lanczos, as A1111's PIL LANCZOS).
pub fn resize<P>(
    img: &image::ImageBuffer<P, Vec<u8>>,
    mode: ResizeMode,
    width: u32,
    height: u32,
) -> image::ImageBuffer<P, Vec<u8>>
where
    P: image::Pixel<Subpixel = u8> + 'static,
{
    let (iw, ih) = img.dimensions();
    if (iw, ih) == (width, height) {
        return img.clone();
    }
    let scaled = |w: u32, h: u32| imageops::resize(img, w.max(1), h.max(1), FilterType::Lanczos3);
    let ratio = width as f64 / height as f64;
    let src_ratio = iw as f64 / ih as f64;
    match mode {
        ResizeMode::JustResize => scaled(width, height),
        ResizeMode::CropAndResize => {
            let (w, h) = if ratio > src_ratio {
                (width, (ih as f64 * width as f64 / iw as f64) as u32)
            } else {
                ((iw as f64 * height as f64 / ih as f64) as u32, height)
            };
            let r = scaled(w, h);
            let (x, y) = ((w.saturating_sub(width)) / 2, (h.saturating_sub(height)) / 2);
            imageops::crop_imm(&r, x, y, width, height).to_image()
        }
        ResizeMode::ResizeAndFill => {
            let (w, h) = if ratio < src_ratio {
                (width, (ih as f64 * width as f64 / iw as f64) as u32)
            } else {
                ((iw as f64 * height as f64 / ih as f64) as u32, height)
            };
            let r = scaled(w, h);
            let (x0, y0) = (width / 2 - w / 2, height / 2 - h / 2);
            // Every target pixel takes the nearest pixel of the scaled image: inside it,
            // itself; in the borders, the stretched edge row or column.
            image::ImageBuffer::from_fn(width, height, |x, y| {
                let sx = x.saturating_sub(x0).min(w - 1);
                let sy = y.saturating_sub(y0).min(h - 1);
                *r.get_pixel(sx, sy)
            })
        }
    }
}

/// RGB8 -> `[1, 3, H, W]` in [-1, 1] (`x / 255 * 2 - 1`).
pub fn to_tensor(img: &RgbImage) -> HostTensor {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut data = vec![0f32; 3 * h * w];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            data[c * h * w + i] = p[c] as f32 / 255.0 * 2.0 - 1.0;
        }
    }
    HostTensor::new(vec![1, 3, h, w], data)
}

/// A1111's mask blur: OpenCV's Gaussian blur (kernel `2 * int(2.5 * r + 0.5) + 1`,
/// sigma `r`, reflected borders) along x, then along y, rounded to 8 bits each time.
pub fn blur_mask(mask: &GrayImage, radius: f32) -> GrayImage {
    if radius <= 0.0 {
        return mask.clone();
    }
    let kernel = gaussian_kernel(radius);
    let pass = |src: &GrayImage, horizontal: bool| {
        let (w, h) = src.dimensions();
        GrayImage::from_fn(w, h, |x, y| {
            let half = (kernel.len() / 2) as i64;
            let mut acc = 0f64;
            for (k, wt) in kernel.iter().enumerate() {
                let off = k as i64 - half;
                let (sx, sy) = if horizontal {
                    (reflect101(x as i64 + off, w as i64), y as i64)
                } else {
                    (x as i64, reflect101(y as i64 + off, h as i64))
                };
                acc += wt * src.get_pixel(sx as u32, sy as u32)[0] as f64;
            }
            image::Luma([acc.round().clamp(0.0, 255.0) as u8])
        })
    };
    pass(&pass(mask, true), false)
}

fn gaussian_kernel(sigma: f32) -> Vec<f64> {
    let half = (2.5 * sigma + 0.5) as i64;
    let s = sigma as f64;
    let k: Vec<f64> = (-half..=half).map(|i| (-(i * i) as f64 / (2.0 * s * s)).exp()).collect();
    let sum: f64 = k.iter().sum();
    k.into_iter().map(|v| v / sum).collect()
}

/// OpenCV's BORDER_REFLECT_101: `gfedcb|abcdefgh|gfedcba`.
fn reflect101(i: i64, n: i64) -> i64 {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n - 1);
    let m = i.rem_euclid(period);
    if m < n { m } else { period - m }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_takes_the_colours_around_the_mask() {
        // Left half red, right half blue; a hole over the middle of the red half.
        let img = RgbImage::from_fn(64, 32, |x, _| image::Rgb(if x < 32 { [200, 0, 0] } else { [0, 0, 200] }));
        let mask = GrayImage::from_fn(64, 32, |x, y| {
            image::Luma([if (8..20).contains(&x) && (8..24).contains(&y) { 255 } else { 0 }])
        });
        let mut holed = img.clone();
        for (x, y, m) in mask.enumerate_pixels() {
            if m[0] > 0 {
                holed.put_pixel(x, y, image::Rgb([0, 255, 0]));
            }
        }
        let filled = fill_masked(&holed, &mask);
        // Unmasked pixels stay; the hole turns red (its neighbours), none of the green stays.
        assert_eq!(filled.get_pixel(40, 5), img.get_pixel(40, 5));
        assert_eq!(filled.get_pixel(2, 2), img.get_pixel(2, 2));
        let p = filled.get_pixel(14, 16);
        assert!(p[0] > 150 && p[1] == 0 && p[2] < 60, "{p:?}");
    }

    #[test]
    fn reflect_101_borders() {
        let got: Vec<i64> = (-3..8).map(|i| reflect101(i, 5)).collect();
        assert_eq!(got, [3, 2, 1, 0, 1, 2, 3, 4, 3, 2, 1]);
    }

    #[test]
    fn resize_modes_give_the_target_size() {
        let img = RgbImage::from_fn(30, 10, |x, _| image::Rgb([x as u8 * 8, 0, 0]));
        for mode in [ResizeMode::JustResize, ResizeMode::CropAndResize, ResizeMode::ResizeAndFill] {
            let r = resize(&img, mode, 16, 16);
            assert_eq!(r.dimensions(), (16, 16), "{mode:?}");
        }
        // Fill: the top border repeats the scaled image's first row.
        let r = resize(&img, ResizeMode::ResizeAndFill, 16, 16);
        assert_eq!(r.get_pixel(3, 0), r.get_pixel(3, 8 - 5 / 2));
    }

    #[test]
    fn blur_keeps_flat_regions_and_softens_edges() {
        let m = GrayImage::from_fn(20, 20, |x, _| image::Luma([if x < 10 { 0 } else { 255 }]));
        let b = blur_mask(&m, 2.0);
        assert_eq!(b.get_pixel(0, 5)[0], 0);
        assert_eq!(b.get_pixel(19, 5)[0], 255);
        let edge = b.get_pixel(10, 5)[0];
        assert!(edge > 100 && edge < 255, "{edge}");
    }
}
