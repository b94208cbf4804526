//! Training images: read, resized and cropped to a square, then VAE-encoded once. The cache
//! keeps each image's latent distribution (mean, std) so a fresh latent can still be drawn
//! every step, as diffusers does with `latent_dist.sample()`.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use image::imageops::FilterType;
use rand::{Rng, RngExt};

use crate::model::layers::{to_device, to_host};
use crate::model::vae::Vae;

use super::TrainError;

const EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "webp", "bmp"];

/// The image files of `dir`, sorted; an error if there are none.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>, TrainError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| TrainError::Data(format!("{}: cannot read the folder: {e}", dir.display())))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension().is_some_and(|x| EXTENSIONS.contains(&x.to_string_lossy().to_lowercase().as_str()))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(TrainError::Data(format!("{}: no images (png, jpg, webp, bmp) in this folder", dir.display())));
    }
    Ok(files)
}

/// Fails on the first file that is not a readable image, before any long work starts.
pub fn check_readable(files: &[PathBuf]) -> Result<(), TrainError> {
    for f in files {
        image::ImageReader::open(f)
            .and_then(|r| r.with_guessed_format())
            .map_err(|e| e.to_string())
            .and_then(|r| r.into_dimensions().map_err(|e| e.to_string()))
            .map_err(|e| TrainError::Data(format!("{}: cannot read the image: {e}", f.display())))?;
    }
    Ok(())
}

/// A square RGB image as `[3, size, size]` floats in [-1, 1].
pub struct Pixels {
    pub size: usize,
    pub chw: Vec<f32>,
}

/// Reads `path`, scales its shorter side to `size` and crops a square (centre, or at a
/// random offset from `rng`). Smaller photos are upscaled with a warning.
pub fn load_square(path: &Path, size: usize, center: bool, rng: &mut impl Rng) -> Result<Pixels, TrainError> {
    let img =
        image::open(path).map_err(|e| TrainError::Data(format!("{}: cannot read the image: {e}", path.display())))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w.min(h) < size {
        eprintln!("warning: {} is {w}x{h}, smaller than --resolution {size}; upscaling it", path.display());
    }
    let scale = size as f64 / w.min(h) as f64;
    let (nw, nh) = (((w as f64 * scale).round() as usize).max(size), ((h as f64 * scale).round() as usize).max(size));
    let img = img.to_rgb8();
    let img = image::imageops::resize(&img, nw as u32, nh as u32, FilterType::Triangle);
    let (x0, y0) = if center {
        ((nw - size) / 2, (nh - size) / 2)
    } else {
        (rng.random_range(0..=nw - size), rng.random_range(0..=nh - size))
    };
    let plane = size * size;
    let mut chw = vec![0f32; 3 * plane];
    for y in 0..size {
        for x in 0..size {
            let p = img.get_pixel((x0 + x) as u32, (y0 + y) as u32);
            for c in 0..3 {
                chw[c * plane + y * size + x] = p[c] as f32 / 127.5 - 1.0;
            }
        }
    }
    Ok(Pixels { size, chw })
}

impl Pixels {
    pub fn flipped(&self) -> Pixels {
        let s = self.size;
        let mut chw = self.chw.clone();
        for row in chw.chunks_mut(s) {
            row.reverse();
        }
        Pixels { size: s, chw }
    }
}

/// One cached view of a training image: its latent distribution, unscaled, `[4, s/8, s/8]`.
#[derive(Clone)]
pub struct CachedLatent {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl CachedLatent {
    /// `(mean + std * eps) * scaling_factor`, a fresh draw of the encoder's latent.
    pub fn sample(&self, eps: &[f32], scaling: f32) -> Vec<f32> {
        self.mean.iter().zip(&self.std).zip(eps).map(|((m, s), e)| (m + s * e) * scaling).collect()
    }
}

pub fn encode(vae: &Vae, px: &Pixels, device: &Device) -> CachedLatent {
    let x = to_device(px.chw.clone(), [1, 3, px.size, px.size], device);
    let dist = vae.encode(x);
    CachedLatent { mean: to_host(dist.mean).data, std: to_host(dist.std).data }
}

/// Every image of `files`, encoded once per view (two views with `flip`).
pub fn encode_folder(
    vae: &Vae,
    files: &[PathBuf],
    size: usize,
    center: bool,
    flip: bool,
    rng: &mut impl Rng,
    device: &Device,
) -> Result<Vec<Vec<CachedLatent>>, TrainError> {
    files
        .iter()
        .map(|f| {
            let px = load_square(f, size, center, rng)?;
            let mut views = vec![encode(vae, &px, device)];
            if flip {
                views.push(encode(vae, &px.flipped(), device));
            }
            Ok(views)
        })
        .collect()
}
