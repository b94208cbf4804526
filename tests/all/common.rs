//! Shared helpers for the reference-parity tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use sdw::device::{self, Compute, DeviceChoice};
use sdw::pipeline::GenerationParams;
use sdw::sampling::Sampler;
use sdw::weights::{HostTensor, SafetensorsFile};

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

pub fn golden(name: &str) -> HostTensor {
    let f = SafetensorsFile::open(&fixture("golden.safetensors")).expect("golden file");
    f.tensor(name).unwrap_or_else(|e| panic!("golden {name}: {e}"))
}

pub fn cases() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("cases.json")).unwrap()).unwrap()
}

/// `||a - b|| / ||b||`.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

pub fn assert_close(what: &str, got: &HostTensor, want: &HostTensor, tol: f64) {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    let e = rel_err(&got.data, &want.data);
    eprintln!("{what}: rel. error {e:.2e}");
    assert!(e < tol, "{what}: rel. error {e:.3e} >= {tol:.0e}");
}

/// True when `SDW_TEST_SKIP_WGPU=1` asks for CPU-only tests; says so, so that a skipped
/// device never passes silently.
pub fn wgpu_skipped() -> bool {
    let skip = std::env::var("SDW_TEST_SKIP_WGPU").as_deref() == Ok("1");
    if skip {
        eprintln!("SDW_TEST_SKIP_WGPU=1: skipping the wgpu device, checking the CPU only");
    }
    skip
}

/// The wgpu device (lavapipe in CI), or none when `SDW_TEST_SKIP_WGPU=1`.
pub fn wgpu() -> Option<Compute> {
    (!wgpu_skipped()).then(|| {
        device::select(DeviceChoice::Wgpu)
            .expect("a wgpu adapter (install mesa-vulkan-drivers, or set SDW_TEST_SKIP_WGPU=1)")
    })
}

/// The CPU backend, and wgpu (lavapipe in CI) unless `SDW_TEST_SKIP_WGPU=1`.
pub fn devices() -> Vec<Compute> {
    std::iter::once(device::select(DeviceChoice::Cpu).unwrap()).chain(wgpu()).collect()
}

/// The generation parameters of a `cases.json` pipeline case (64x64 unless it says).
pub fn case_params(case: &serde_json::Value) -> GenerationParams {
    GenerationParams {
        prompt: case["prompt"].as_str().unwrap().into(),
        negative_prompt: case["negative_prompt"].as_str().unwrap().into(),
        sampler: Sampler::parse(case["sampler"].as_str().unwrap()).unwrap(),
        steps: case["steps"].as_u64().unwrap() as usize,
        cfg_scale: case["cfg_scale"].as_f64().unwrap() as f32,
        seed: case["seed"].as_u64().unwrap(),
        width: case["width"].as_u64().unwrap_or(64) as usize,
        height: case["height"].as_u64().unwrap_or(64) as usize,
        ..Default::default()
    }
}

/// A fresh, empty folder for one test. Folders earlier test processes left for the same
/// test are removed first (their process has ended), so runs do not fill the disk.
pub fn temp_dir(what: &str) -> PathBuf {
    let prefix = format!("sdw-{what}-");
    if let Ok(read) = std::fs::read_dir(std::env::temp_dir()) {
        for e in read.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name.strip_prefix(&prefix).and_then(|p| p.parse::<u32>().ok());
            if let Some(pid) = pid
                && pid != std::process::id()
                && Path::new("/proc/self").exists()
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let dir = std::env::temp_dir().join(format!("sdw-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The largest difference between two 8-bit images, in levels.
pub fn max_level_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len(), "image sizes differ");
    a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0)
}

/// Inpainting's promise, pixel by pixel: where the (blurred) mask is 0 the result is the
/// original exactly (panics naming the pixel otherwise). Returns (pixels kept, pixels at
/// mask >= `repaint_from` that changed).
pub fn kept_and_repainted(
    what: &str,
    result: &[u8],
    original: &[u8],
    mask: &image::GrayImage,
    repaint_from: u8,
) -> (usize, usize) {
    let (mut kept, mut changed) = (0, 0);
    for (i, m) in mask.pixels().enumerate() {
        let (got, orig) = (&result[3 * i..3 * i + 3], &original[3 * i..3 * i + 3]);
        if m[0] == 0 {
            assert_eq!(got, orig, "{what}: unmasked pixel {i} changed");
            kept += 1;
        } else if m[0] >= repaint_from && got != orig {
            changed += 1;
        }
    }
    eprintln!("{what}: {kept} unmasked pixels kept exactly, {changed} masked pixels repainted");
    (kept, changed)
}

/// An image file's RGB bytes.
pub fn rgb_bytes(path: &std::path::Path) -> Vec<u8> {
    image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).to_rgb8().into_raw()
}

/// `sdw txt2img` options for a `cases.json` pipeline case.
pub fn case_cli_args(case: &serde_json::Value) -> Vec<String> {
    let s = |k: &str| case[k].as_str().unwrap().to_owned();
    let n = |k: &str| case[k].to_string();
    [
        ("--prompt", s("prompt")),
        ("--negative-prompt", s("negative_prompt")),
        ("--sampler", s("sampler")),
        ("--steps", n("steps")),
        ("--cfg-scale", n("cfg_scale")),
        ("--seed", n("seed")),
        ("--width", case["width"].as_u64().unwrap_or(64).to_string()),
        ("--height", case["height"].as_u64().unwrap_or(64).to_string()),
    ]
    .into_iter()
    .flat_map(|(k, v)| [k.to_owned(), v])
    .collect()
}
