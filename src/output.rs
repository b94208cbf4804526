//! Saving images the way AUTOMATIC1111 does: 8-bit truncation, a `parameters` text
//! chunk with the infotext, and `00003-4040056495.png` names that never overwrite.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// An 8-bit RGB image.
#[derive(Clone, Debug)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

/// `[3, H, W]` floats in [-1, 1] (one image of the VAE output) -> 8-bit RGB, truncating
/// like A1111 (`(clamp(x, -1, 1) + 1) / 2 * 255` cast to u8).
pub fn to_rgb8(chw: &[f32], height: usize, width: usize) -> RgbImage {
    let plane = height * width;
    let mut pixels = Vec::with_capacity(plane * 3);
    for i in 0..plane {
        for c in 0..3 {
            let v = (chw[c * plane + i].clamp(-1.0, 1.0) + 1.0) / 2.0 * 255.0;
            pixels.push(v as u8);
        }
    }
    RgbImage { width, height, pixels }
}

/// Writes a PNG with an A1111 `parameters` chunk to `path`, failing if it exists.
pub fn write_png(path: &Path, img: &RgbImage, parameters: &str) -> std::io::Result<()> {
    let file = OpenOptions::new().write(true).create_new(true).open(path)?;
    encode_png(BufWriter::new(file), img, parameters)
}

/// `img` as PNG with the infotext in its `parameters` chunk, as A1111 writes it.
pub fn encode_png(out: impl Write, img: &RgbImage, parameters: &str) -> std::io::Result<()> {
    let mut enc = png::Encoder::new(out, img.width as u32, img.height as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    // PIL (and so A1111) writes tEXt when the text is Latin-1, iTXt otherwise.
    if parameters.chars().all(|c| (c as u32) < 256) {
        enc.add_text_chunk("parameters".into(), parameters.into()).map_err(std::io::Error::other)?;
    } else {
        enc.add_itxt_chunk("parameters".into(), parameters.into()).map_err(std::io::Error::other)?;
    }
    let mut w = enc.write_header().map_err(std::io::Error::other)?;
    w.write_image_data(&img.pixels).map_err(std::io::Error::other)?;
    w.finish().map_err(std::io::Error::other)
}

/// Reads the `parameters` text of a PNG (sdw's or A1111's), if any.
pub fn read_parameters(path: &Path) -> std::io::Result<Option<String>> {
    parameters_of(std::io::BufReader::new(File::open(path)?))
}

/// The `parameters` text of PNG data, if any.
pub fn parameters_of(png_data: impl std::io::BufRead + std::io::Seek) -> std::io::Result<Option<String>> {
    let reader = png::Decoder::new(png_data).read_info().map_err(std::io::Error::other)?;
    let info = reader.info();
    if let Some(t) = info.uncompressed_latin1_text.iter().find(|t| t.keyword == "parameters") {
        return Ok(Some(t.text.clone()));
    }
    for t in &info.utf8_text {
        if t.keyword == "parameters" {
            return Ok(Some(t.get_text().map_err(std::io::Error::other)?));
        }
    }
    Ok(None)
}

/// Next A1111-style name in `dir`: `{n:05}-{seed}.png` with n one past the highest in use.
pub fn next_in_dir(dir: &Path, seed: u64) -> std::io::Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let mut next = 0u64;
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        let digits: String = name.chars().take_while(char::is_ascii_digit).collect();
        if digits.len() >= 5 && name[digits.len()..].starts_with('-') {
            next = next.max(digits.parse::<u64>().unwrap_or(0) + 1);
        }
    }
    Ok(dir.join(format!("{next:05}-{seed}.png")))
}

/// `path` if free, else `stem-2.ext`, `stem-3.ext`, ... (a user's file is never overwritten).
pub fn fresh_path(path: &Path) -> PathBuf {
    if !path.exists() {
        return path.to_owned();
    }
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let ext = path.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
    (2..).map(|i| path.with_file_name(format!("{stem}-{i}{ext}"))).find(|p| !p.exists()).expect("unbounded search")
}

/// A1111's "Model hash": first 10 hex digits of the file's SHA-256, cached by path,
/// size and modification time so a 4 GB file is hashed once.
pub fn model_hash(path: &Path) -> std::io::Result<String> {
    let key = hash_key(path)?;
    let cache = cache_file();
    let mut entries = cached_hashes();
    if let Some(h) = entries.get(&key) {
        return Ok(h.clone());
    }
    let hash = sha256_file(path)?;
    entries.insert(key, hash.clone());
    if let Some(c) = cache {
        // Best effort: a cache that cannot be written only costs a re-hash next time.
        let _ = write_atomic(&c, serde_json::to_string_pretty(&entries).unwrap_or_default().as_bytes());
    }
    Ok(hash)
}

/// [`model_hash`] if it is in the cache, without reading the file (listings).
pub fn cached_model_hash(path: &Path) -> Option<String> {
    cached_hashes().remove(&hash_key(path).ok()?)
}

/// The cache key of a file: its canonical path, size and modification time.
fn hash_key(path: &Path) -> std::io::Result<String> {
    let meta = fs::metadata(path)?;
    let mtime =
        meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_secs());
    Ok(format!("{}|{}|{}", fs::canonicalize(path)?.display(), meta.len(), mtime))
}

fn cached_hashes() -> std::collections::BTreeMap<String, String> {
    cache_file()
        .and_then(|c| fs::read_to_string(c).ok())
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default()
}

pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    sha256_hex(File::open(path)?)
}

/// FNV-1a: a stable 64-bit hash of a name or text (std's hasher may change between
/// releases), for seeds and cache keys, not for security.
pub fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// Hex SHA-256 of everything `reader` yields.
pub fn sha256_hex(mut reader: impl Read) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    std::io::copy(&mut reader, &mut hasher)?;
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// sdw's cache folder (`SDW_CACHE_DIR`, else `$XDG_CACHE_HOME/sdw`, else `~/.cache/sdw`),
/// created on first use: model hashes and the GPU kernel/autotune cache live there.
pub fn cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("SDW_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("sdw")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/sdw")))?;
    fs::create_dir_all(&base).ok()?;
    Some(base)
}

fn cache_file() -> Option<PathBuf> {
    Some(cache_dir()?.join("hashes.json"))
}

/// Write to a temporary sibling, then rename: readers never see a half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)
}

/// Formats a number as A1111 does in infotexts: `7`, `5.5`.
pub fn fmt_num(x: f32) -> String {
    if x.fract() == 0.0 && x.abs() < 1e9 { format!("{}", x as i64) } else { format!("{x}") }
}
