//! What a run shows the user: progress lines on stderr, `loss.csv`, a `loss.png` plot and
//! validation grids.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use image::{Rgb, RgbImage};

use super::run::StepLoss;

/// Progress on stderr: step, smoothed loss, learning rate, it/s and ETA.
pub struct Progress {
    start: Instant,
    first_step: usize,
    total: usize,
    smoothed: Option<f32>,
}

impl Progress {
    pub fn new(first_step: usize, total: usize) -> Self {
        Self { start: Instant::now(), first_step, total, smoothed: None }
    }

    /// Exponential moving average of the loss (the raw one jumps with the random timestep).
    pub fn update(&mut self, step: usize, l: &StepLoss) -> f32 {
        let s = match self.smoothed {
            Some(prev) => 0.95 * prev + 0.05 * l.loss,
            None => l.loss,
        };
        self.smoothed = Some(s);
        let done = step - self.first_step;
        let elapsed = self.start.elapsed().as_secs_f64();
        let rate = done as f64 / elapsed.max(1e-9);
        let eta = (self.total - step) as f64 / rate.max(1e-9);
        let every = if self.total <= 200 { 1 } else { 10 };
        if step.is_multiple_of(every) || step == self.total {
            eprintln!("step {step}/{}  loss {s:.4}  lr {:.2e}  {rate:.2} it/s  ETA {}", self.total, l.lr, clock(eta));
        }
        s
    }
}

fn clock(secs: f64) -> String {
    let s = secs.round() as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

pub const CSV_HEADER: &str = "step,loss,instance_loss,prior_loss,lr,smoothed_loss";

/// Appends one row to `loss.csv` (created with a header).
pub fn append_csv(path: &Path, step: usize, l: &StepLoss, smoothed: f32) -> std::io::Result<()> {
    let new = !path.exists();
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    if new {
        writeln!(f, "{CSV_HEADER}")?;
    }
    writeln!(f, "{step},{},{},{},{:e},{smoothed}", l.loss, l.instance, l.prior, l.lr)
}

/// Drops rows after `step` (a resumed run continues from its checkpoint).
pub fn truncate_csv(path: &Path, step: usize) -> std::io::Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| l.split(',').next().and_then(|s| s.parse::<usize>().ok()).is_none_or(|s| s <= step))
        .collect();
    crate::output::write_atomic(path, format!("{}\n", kept.join("\n")).as_bytes())
}

/// Plots the smoothed loss column of `loss.csv` (raw loss in grey) as `loss.png`.
pub fn plot_csv(csv: &Path, png: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(csv).map_err(|e| e.to_string())?;
    let rows: Vec<(f32, f32)> = text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let c: Vec<&str> = l.split(',').collect();
            Some((c.get(1)?.parse().ok()?, c.get(5)?.parse().ok()?))
        })
        .collect();
    let img = plot(&rows);
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png).map_err(|e| e.to_string())?;
    crate::output::write_atomic(png, &bytes).map_err(|e| e.to_string())
}

/// A plain line plot: x = step, y = loss from 0 to the largest value.
fn plot(rows: &[(f32, f32)]) -> RgbImage {
    let (w, h, m) = (640u32, 360u32, 20u32);
    let mut img = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    for x in m..w - m {
        img.put_pixel(x, h - m, Rgb([0, 0, 0]));
    }
    for y in m..h - m {
        img.put_pixel(m, y, Rgb([0, 0, 0]));
    }
    let top = rows.iter().map(|r| r.0.max(r.1)).filter(|v| v.is_finite()).fold(0f32, f32::max).max(1e-12);
    let n = rows.len().max(2) - 1;
    let point = |i: usize, v: f32| {
        let x = m + ((w - 2 * m) as f32 * i as f32 / n as f32) as u32;
        let y = (h - m) as f32 - (h - 2 * m) as f32 * (v / top).clamp(0.0, 1.0);
        (x.min(w - 1), (y as u32).min(h - 1))
    };
    for (i, &(raw, smooth)) in rows.iter().enumerate() {
        let (x, y) = point(i, raw);
        img.put_pixel(x, y, Rgb([180, 180, 180]));
        let (x, y) = point(i, smooth);
        for dy in 0..2 {
            img.put_pixel(x, (y + dy).min(h - 1), Rgb([200, 30, 30]));
        }
    }
    img
}

/// Lays `[3, s, s]` images in a grid (up to 4 per row) as 8-bit RGB.
pub fn grid(images: &[Vec<f32>], size: usize) -> RgbImage {
    let cols = images.len().clamp(1, 4);
    let rows = images.len().div_ceil(cols).max(1);
    let mut out = RgbImage::new((cols * size) as u32, (rows * size) as u32);
    for (i, chw) in images.iter().enumerate() {
        let tile = crate::output::to_rgb8(chw, size, size);
        let (ox, oy) = ((i % cols * size) as u32, (i / cols * size) as u32);
        for (j, px) in tile.pixels.chunks(3).enumerate() {
            out.put_pixel(ox + (j % size) as u32, oy + (j / size) as u32, Rgb([px[0], px[1], px[2]]));
        }
    }
    out
}
