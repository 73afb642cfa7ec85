//! Output encoding: decoded images → PNG exactly as the reference's torchvision `save_image`
//! (clamp to `[-1, 1]`, (x + 1) / 2, ⌊255·v + 0.5⌋), and `.npy` arrays for modes and latents.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{DynamicImage, GrayImage, ImageFormat, RgbImage};
use ndarray::{ArrayView3, Dimension};
use ndarray_npy::{WritableElement, WriteNpyExt};
use thiserror::Error;

/// Errors of output encoding and writing.
#[derive(Debug, Error)]
pub enum SinkError {
    /// A file or its parent folder cannot be written.
    #[error("cannot write `{path}`")]
    Io {
        /// The file being written.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The PNG encoder failed.
    #[error("cannot encode PNG")]
    Png(#[from] image::ImageError),
    /// An array cannot be encoded as `.npy`.
    #[error("cannot encode `{path}` as .npy")]
    Npy {
        /// The name the array is written under (for the message).
        path: PathBuf,
        /// The encoder's error.
        #[source]
        source: ndarray_npy::WriteNpyError,
    },
    /// An image tensor holds a NaN or an infinity: it is never quantised into a PNG (a NaN would
    /// become a black pixel).
    #[error("an image holds a non-finite value ({0})")]
    NonFinite(f32),
    /// An image tensor whose channel count is neither 1 nor 3.
    #[error("an image must have 1 or 3 channels, got {0}")]
    Channels(usize),
}

/// One channel value of the reference's `save_image(normalize=True, value_range=(-1, 1))`:
/// ⌊255·(clamp(v, −1, 1) + 1)/2 + 0.5⌋ (NaN gives 0: [`png_bytes`] refuses non-finite images
/// before they get here).
pub fn to_u8(v: f32) -> u8 {
    let v = v.clamp(-1.0, 1.0);
    let v = (v + 1.0) / 2.0;
    (v * 255.0 + 0.5).clamp(0.0, 255.0) as u8
}

/// PNG bytes of a decoded image `[c, S, S]` in about `[-1, 1]` (c = 1 or 3), quantised by
/// [`to_u8`].
///
/// # Errors
/// [`SinkError::NonFinite`] for a NaN or an infinity, [`SinkError::Channels`] for another
/// channel count, [`SinkError::Png`] when encoding fails.
pub fn png_bytes(image: ArrayView3<f32>) -> Result<Vec<u8>, SinkError> {
    if let Some(&value) = image.iter().find(|v| !v.is_finite()) {
        return Err(SinkError::NonFinite(value));
    }
    let pixels = tensor_pixels(image);
    let (w, h) = (pixels.width as u32, pixels.height as u32);
    let dynamic = match pixels.channels {
        1 => DynamicImage::ImageLuma8(GrayImage::from_raw(w, h, pixels.data).expect("size")),
        3 => DynamicImage::ImageRgb8(RgbImage::from_raw(w, h, pixels.data).expect("size")),
        other => return Err(SinkError::Channels(other)),
    };
    let mut bytes = Cursor::new(Vec::new());
    dynamic.write_to(&mut bytes, ImageFormat::Png)?;
    Ok(bytes.into_inner())
}

/// `.npy` bytes of an array; `name` only labels errors.
///
/// # Errors
/// [`SinkError::Npy`] when the array cannot be encoded.
pub fn npy_bytes<A: WritableElement, D: Dimension>(
    array: &ndarray::ArrayRef<A, D>,
    name: &Path,
) -> Result<Vec<u8>, SinkError> {
    let mut bytes = Vec::new();
    array.write_npy(&mut bytes).map_err(|source| SinkError::Npy { path: name.into(), source })?;
    Ok(bytes)
}

/// Writes `bytes` to `path`, creating parent folders; the file appears whole or not at all
/// (written to `<path>.partial`, then renamed).
///
/// # Errors
/// [`SinkError::Io`] when a folder or the file cannot be written.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), SinkError> {
    let io = |source| SinkError::Io { path: path.into(), source };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    std::fs::write(&partial, bytes).map_err(io)?;
    std::fs::rename(&partial, path).map_err(io)
}

/// 8-bit pixels of an image tensor `[c, S, S]` in about `[-1, 1]`, quantised like the PNGs.
pub fn tensor_pixels(image: ArrayView3<f32>) -> crate::data::Pixels {
    let (c, h, w) = image.dim();
    let mut data = Vec::with_capacity(c * h * w);
    for y in 0..h {
        for x in 0..w {
            for ch in 0..c {
                data.push(to_u8(image[[ch, y, x]]));
            }
        }
    }
    crate::data::Pixels { width: w, height: h, channels: c, data }
}

/// A class's contact sheet as PNG ([`mgd3_common::sheet::SheetLayout::labelled`]): `title` in
/// a band on top, the row names (real / modes / samples) on the left, and `rows` of equally sized
/// tiles enlarged by a whole factor (nearest neighbour, so pixels stay pixels) until readable,
/// with a white gap; grayscale tiles are shown as grey. The first tile sets the tile size;
/// larger tiles are cut to it.
///
/// # Errors
/// [`SinkError::Png`] when encoding fails.
pub fn contact_sheet_png(title: &str, rows: &[Vec<crate::data::Pixels>]) -> Result<Vec<u8>, SinkError> {
    use mgd3_common::sheet::{self, SheetLayout};
    let image = rows.iter().flatten().next().map(|p| (p.width as u32, p.height as u32)).unwrap_or((1, 1));
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0).max(1) as u32;
    let layout = SheetLayout::labelled(image, columns, rows.len() as u32);
    let factor = layout.tile.0 / image.0.max(1);
    let (width, height) = layout.size();
    let mut canvas = RgbImage::from_pixel(width, height, image::Rgb([255, 255, 255]));
    let ink = [40, 40, 40];
    let pad = 2 * sheet::GAP * layout.text_scale;
    let title = sheet::fit_text(title, width.saturating_sub(2 * pad), layout.text_scale);
    sheet::draw_text(&mut canvas, pad, pad, &title, layout.text_scale, ink);
    for (r, row) in rows.iter().enumerate() {
        let (_, y0) = layout.tile_origin(0, r as u32);
        if let Some(name) = sheet::ROW_NAMES.get(r) {
            let y = y0 + layout.tile.1.saturating_sub(sheet::GLYPH * layout.text_scale) / 2;
            sheet::draw_text(&mut canvas, pad, y, name, layout.text_scale, ink);
        }
        for (col, pixels) in row.iter().enumerate() {
            let (x0, y0) = layout.tile_origin(col as u32, r as u32);
            for y in 0..(pixels.height as u32).min(image.1) {
                for x in 0..(pixels.width as u32).min(image.0) {
                    let i = (y as usize * pixels.width + x as usize) * pixels.channels;
                    let rgb = if pixels.channels == 1 {
                        [pixels.data[i]; 3]
                    } else {
                        [pixels.data[i], pixels.data[i + 1], pixels.data[i + 2]]
                    };
                    for dy in 0..factor {
                        for dx in 0..factor {
                            canvas.put_pixel(x0 + x * factor + dx, y0 + y * factor + dy, image::Rgb(rgb));
                        }
                    }
                }
            }
        }
    }
    let mut bytes = Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(canvas).write_to(&mut bytes, ImageFormat::Png)?;
    Ok(bytes.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    #[test]
    fn quantises_like_torchvision() {
        assert_eq!(to_u8(-1.5), 0);
        assert_eq!(to_u8(-1.0), 0);
        assert_eq!(to_u8(1.0), 255);
        assert_eq!(to_u8(7.0), 255);
        assert_eq!(to_u8(0.0), 128); // 127.5 + 0.5 = 128
        assert_eq!(to_u8(f32::NAN), 0);
    }

    /// A NaN or an infinity anywhere in an image is refused, never quantised into a PNG.
    #[test]
    fn non_finite_images_are_never_encoded() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut img = Array3::<f32>::zeros((3, 4, 4));
            img[[2, 3, 1]] = bad;
            match png_bytes(img.view()) {
                Err(SinkError::NonFinite(v)) => assert_eq!(v.is_nan(), bad.is_nan()),
                other => panic!("{bad}: {:?}", other.map(|b| b.len())),
            }
        }
    }

    #[test]
    fn png_round_trips() {
        let img = Array3::from_shape_fn((3, 4, 5), |(c, y, x)| (c as f32 - 1.0) * 0.5 + (x + y) as f32 * 0.01);
        let bytes = png_bytes(img.view()).unwrap();
        let back = image::load_from_memory(&bytes).unwrap().to_rgb8();
        assert_eq!(back.dimensions(), (5, 4));
        assert_eq!(back.get_pixel(2, 1).0, [to_u8(img[[0, 1, 2]]), to_u8(img[[1, 1, 2]]), to_u8(img[[2, 1, 2]])]);
        assert!(png_bytes(Array3::zeros((2, 2, 2)).view()).is_err());
    }
}
