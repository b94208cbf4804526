//! Images in and out of JSON: base64 (plain or a `data:image/...;base64,` URL) to pixels,
//! with size limits, and PNGs with their infotext back to base64.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use image::DynamicImage;

use crate::output;

use super::error::ApiError;

/// Largest image side the server decodes.
pub const MAX_IMAGE_SIDE: u32 = 4096;

/// Decodes `what` (e.g. `init_images[0]`) into an image: 422 when it is not base64 or not
/// an image, 413 when it is larger than [`MAX_IMAGE_SIDE`].
pub fn decode(data: &str, what: &str) -> Result<DynamicImage, ApiError> {
    let bytes = decode_bytes(data, what)?;
    let mut reader = image::ImageReader::new(std::io::Cursor::new(&bytes))
        .with_guessed_format()
        .map_err(|e| ApiError::unprocessable(format!("{what}: {e}")))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    reader.limits(limits);
    reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => {
            ApiError::too_large(format!("{what}: larger than {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} pixels"))
        }
        e => ApiError::unprocessable(format!("{what} is not an image: {e}")),
    })
}

/// The bytes of a base64 string or `data:` URL.
pub fn decode_bytes(data: &str, what: &str) -> Result<Vec<u8>, ApiError> {
    let data = data.trim();
    let b64 = match data.strip_prefix("data:") {
        Some(url) => url.split_once(',').map(|(_, b)| b).unwrap_or(""),
        None => data,
    };
    if b64.starts_with("http://") || b64.starts_with("https://") {
        return Err(ApiError::unprocessable(format!("{what}: sdw does not fetch image URLs; send base64")));
    }
    // A1111's decoder discards whitespace (line-wrapped base64 from some clients).
    let compact: String = b64.chars().filter(|c| !c.is_whitespace()).collect();
    STANDARD
        .decode(compact.as_bytes())
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(compact.trim_end_matches('=')))
        .map_err(|e| ApiError::unprocessable(format!("{what} is not base64: {e}")))
}

/// PNG with the infotext, base64 (no `data:` prefix), as A1111 returns images.
pub fn encode_png(img: &output::RgbImage, infotext: &str) -> Result<String, ApiError> {
    let mut bytes = Vec::new();
    output::encode_png(&mut bytes, img, infotext).map_err(|e| ApiError::internal(format!("encoding a PNG: {e}")))?;
    Ok(STANDARD.encode(bytes))
}

/// The `parameters` text of an image sent as base64 (`None` when it has none).
pub fn parameters(data: &str) -> Result<Option<String>, ApiError> {
    let bytes = decode_bytes(data, "image")?;
    if !bytes.starts_with(b"\x89PNG") {
        // Only PNGs carry A1111's text chunk; anything else decodable has none.
        image::load_from_memory(&bytes).map_err(|e| ApiError::unprocessable(format!("image is not an image: {e}")))?;
        return Ok(None);
    }
    output::parameters_of(std::io::Cursor::new(bytes))
        .map_err(|e| ApiError::unprocessable(format!("image is not a readable PNG: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_forms() {
        let img = output::RgbImage { width: 2, height: 1, pixels: vec![255, 0, 0, 0, 0, 255] };
        let b64 = encode_png(&img, "a cat\nSteps: 2, Seed: 1, Size: 2x1").unwrap();
        for form in [b64.clone(), format!("data:image/png;base64,{b64}"), format!(" {b64}\n")] {
            let decoded = decode(&form, "x").unwrap().to_rgb8();
            assert_eq!(decoded.as_raw(), &img.pixels);
        }
        assert_eq!(parameters(&b64).unwrap().as_deref(), Some("a cat\nSteps: 2, Seed: 1, Size: 2x1"));
        let e = decode("not base64!", "init_images[0]").unwrap_err();
        assert_eq!((e.status.as_u16(), e.detail.contains("init_images[0]")), (422, true));
        let e = decode(&STANDARD.encode(b"plain text"), "mask").unwrap_err();
        assert_eq!(e.status.as_u16(), 422);
    }
}
