//! Pixels to and from PNG files.

use std::path::Path;

use tch::{Kind, Tensor};

use crate::error::{ModelError, Result};

/// Converts one image `[3, H, W]` in [-1, 1] to 8-bit RGB the way torchvision's `save_image(...,
/// normalize=True, value_range=(-1, 1))` does: clamp, map to [0, 1], `·255 + 0.5`, truncate.
pub fn to_rgb8(image: &Tensor) -> Result<image::RgbImage> {
    let s = image.size();
    if s.len() != 3 || s[0] != 3 {
        return Err(ModelError::InvalidInput(format!(
            "an image must be [3, H, W], got {s:?}"
        )));
    }
    let bytes = image
        .to_kind(Kind::Float)
        .clamp(-1.0, 1.0)
        .g_add_scalar(1.0)
        .g_div_scalar(2.0)
        .g_mul_scalar(255.0)
        .g_add_scalar(0.5)
        .clamp(0.0, 255.0)
        .to_kind(Kind::Uint8)
        .permute([1, 2, 0])
        .contiguous()
        .to_device(tch::Device::Cpu);
    let data = Vec::<u8>::try_from(bytes.reshape([-1]))?;
    image::RgbImage::from_raw(s[2] as u32, s[1] as u32, data)
        .ok_or_else(|| ModelError::InvalidInput("image buffer has the wrong size".into()))
}

/// Writes one image `[3, H, W]` in [-1, 1] as a PNG.
pub fn save_png(image: &Tensor, path: &Path) -> Result<()> {
    let rgb = to_rgb8(image)?;
    rgb.save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| ModelError::io(path, std::io::Error::other(e)))
}

/// Encodes one image `[3, H, W]` in [-1, 1] as PNG bytes.
pub fn png_bytes(image: &Tensor) -> Result<Vec<u8>> {
    let rgb = to_rgb8(image)?;
    let mut out = std::io::Cursor::new(Vec::new());
    rgb.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| ModelError::InvalidInput(format!("PNG encoding failed: {e}")))?;
    Ok(out.into_inner())
}

/// Reads a PNG (or any format the `image` crate knows) as `[3, H, W]` fp32 in [-1, 1]; an alpha
/// channel is composited on white.
pub fn load_image(path: &Path) -> Result<Tensor> {
    let img = image::open(path)
        .map_err(|e| ModelError::InvalidInput(format!("{}: {e}", path.display())))?;
    let rgba = img.to_rgba8();
    let (w, h) = rgba.dimensions();
    let mut data = Vec::with_capacity((w * h * 3) as usize);
    for p in rgba.pixels() {
        let a = f32::from(p[3]) / 255.0;
        for c in 0..3 {
            let v = f32::from(p[c]) / 255.0 * a + (1.0 - a);
            data.push(v * 2.0 - 1.0);
        }
    }
    Ok(Tensor::from_slice(&data)
        .view([i64::from(h), i64::from(w), 3])
        .permute([2, 0, 1])
        .contiguous())
}
