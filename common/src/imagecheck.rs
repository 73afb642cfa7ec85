//! What makes image bytes a usable real image: a format mgd3 reads, complete (a JPEG that stops
//! before its end marker is refused, as PIL refuses it, where decoders would fill it with grey),
//! decoding without error (a JPEG's scan data strictly: a corrupt scan is refused, as PIL refuses
//! it, where the `image` crate's lenient decoder fills the rest with grey), not zero-sized. The worker decodes every real image through
//! [`decode_image`]; `coordinator check --decode` runs the same test on a whole dataset before a
//! job is submitted, so that a corrupt file shows up then, not hours into the run.

use image::{DynamicImage, ImageFormat};
use thiserror::Error;

/// The largest file read as one image: 256 MiB (an uncompressed 64-megapixel RGB TIFF is 192 MB;
/// the largest ImageNet JPEG is under 16 MB). Workers refuse a larger file (a sparse or misnamed
/// file, read whole, would exhaust their memory); submit and `check --decode` name it first.
pub const MAX_IMAGE_BYTES: u64 = 256 << 20;

/// Why image bytes are not a usable image.
#[derive(Debug, Error)]
pub enum ImageProblem {
    /// The file is empty.
    #[error("empty file (0 bytes)")]
    Empty,
    /// The bytes are not an image of a format mgd3 reads (JPEG, PNG, BMP, WebP, TIFF, PNM).
    #[error("not an image of a format mgd3 reads")]
    Format(#[source] image::ImageError),
    /// The data ends before the image does (a JPEG without its end-of-image marker).
    #[error("truncated: the {format} data ends before the image does ({bytes} bytes)")]
    Truncated {
        /// The format (`JPEG`).
        format: &'static str,
        /// Size of the data in bytes.
        bytes: usize,
    },
    /// The decoder failed.
    #[error("the {format} decoder failed")]
    Decode {
        /// The format the bytes announce.
        format: &'static str,
        /// The decoder's error.
        #[source]
        source: image::ImageError,
    },
    /// The image decodes to zero width or height.
    #[error("empty image ({width}×{height})")]
    Degenerate {
        /// Decoded width in pixels.
        width: u32,
        /// Decoded height in pixels.
        height: u32,
    },
}

/// Whether a JPEG's bytes hold the end-of-image marker after the start of its scan data.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let Some(scan) = bytes.windows(2).position(|w| w == [0xFF, 0xDA]) else {
        return false;
    };
    bytes[scan..].windows(2).any(|w| w == [0xFF, 0xD9])
}

/// Decodes image bytes, refusing what is not a usable image (see the module doc).
///
/// # Errors
/// [`ImageProblem::Empty`] for no bytes, [`ImageProblem::Format`] for an unknown format, [`ImageProblem::Truncated`] for a JPEG cut
/// short, [`ImageProblem::Decode`] for a decoder failure, [`ImageProblem::Degenerate`] for a
/// zero-sized image.
pub fn decode_image(bytes: &[u8]) -> Result<DynamicImage, ImageProblem> {
    if bytes.is_empty() {
        return Err(ImageProblem::Empty);
    }
    let format = image::guess_format(bytes).map_err(ImageProblem::Format)?;
    let name = format_name(format);
    if format == ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        return Err(ImageProblem::Truncated { format: name, bytes: bytes.len() });
    }
    let image = if format == ImageFormat::Jpeg {
        decode_jpeg(bytes).map_err(|source| ImageProblem::Decode { format: name, source })?
    } else {
        image::load_from_memory_with_format(bytes, format)
            .map_err(|source| ImageProblem::Decode { format: name, source })?
    };
    if image.width() == 0 || image.height() == 0 {
        return Err(ImageProblem::Degenerate { width: image.width(), height: image.height() });
    }
    Ok(image)
}

/// A JPEG decoded as the `image` crate decodes it (zune-jpeg; RGB, RGBA, grey and grey-alpha
/// kept, every other colour space — CMYK, YCCK — converted to RGB; EXIF orientation not applied,
/// as torchvision does not) but in zune-jpeg's strict mode: scan data that does not decode (a
/// bad Huffman code, a marker inside the scan, data running out) is an error. The `image` crate
/// asks for the lenient mode, which stops at the fault and fills the rest of the image with
/// grey, so a corrupt file became a real image without a word.
fn decode_jpeg(bytes: &[u8]) -> Result<DynamicImage, image::ImageError> {
    use zune_core::colorspace::ColorSpace;
    let fault = |error: zune_jpeg::errors::DecodeErrors| {
        image::ImageError::Decoding(image::error::DecodingError::new(ImageFormat::Jpeg.into(), error))
    };
    let options = zune_core::options::DecoderOptions::default()
        .set_strict_mode(true)
        .set_max_width(usize::MAX)
        .set_max_height(usize::MAX);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(zune_core::bytestream::ZCursor::new(bytes), options);
    decoder.decode_headers().map_err(fault)?;
    let out = match decoder.input_colorspace() {
        Some(space @ (ColorSpace::RGB | ColorSpace::RGBA | ColorSpace::Luma | ColorSpace::LumaA)) => space,
        _ => ColorSpace::RGB,
    };
    decoder.set_options(decoder.options().jpeg_set_out_colorspace(out));
    let pixels = decoder.decode().map_err(fault)?;
    let (width, height) = decoder.dimensions().map(|(w, h)| (w as u32, h as u32)).unwrap_or_default();
    let decoded = pixels.len();
    let wrong_size = || {
        image::ImageError::Decoding(image::error::DecodingError::new(
            ImageFormat::Jpeg.into(),
            format!("{decoded} bytes decoded for a {width}×{height} {out:?} image"),
        ))
    };
    match out {
        ColorSpace::Luma => image::GrayImage::from_raw(width, height, pixels).map(DynamicImage::ImageLuma8),
        ColorSpace::LumaA => image::GrayAlphaImage::from_raw(width, height, pixels).map(DynamicImage::ImageLumaA8),
        ColorSpace::RGBA => image::RgbaImage::from_raw(width, height, pixels).map(DynamicImage::ImageRgba8),
        _ => image::RgbImage::from_raw(width, height, pixels).map(DynamicImage::ImageRgb8),
    }
    .ok_or_else(wrong_size)
}

fn format_name(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::Png => "PNG",
        ImageFormat::Bmp => "BMP",
        ImageFormat::WebP => "WebP",
        ImageFormat::Tiff => "TIFF",
        ImageFormat::Pnm => "PNM",
        _ => "image",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        image::RgbImage::new(width, height).write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    fn jpeg() -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        image::RgbImage::from_pixel(16, 16, image::Rgb([200, 10, 10])).write_to(&mut out, ImageFormat::Jpeg).unwrap();
        out.into_inner()
    }

    /// JPEGs are decoded strictly but otherwise as the `image` crate decodes them: the same
    /// pixels for baseline, progressive, grey, CMYK and stray bytes before the end marker (and a
    /// file whose garbled scan still decodes, as Pillow reads it too); scan data that does not
    /// decode — the file Pillow refuses with "broken data stream" — is a decode error, where the
    /// `image` crate filled the image's rest with grey. Fixtures: `scripts/make_jpeg_fixtures.py`.
    #[test]
    fn jpegs_decode_as_before_and_a_corrupt_scan_is_refused() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/jpeg");
        for name in ["good", "progressive", "grey", "cmyk", "extraneous", "corrupt_read"] {
            let bytes = std::fs::read(dir.join(format!("{name}.jpg"))).unwrap();
            let lenient = image::load_from_memory(&bytes).unwrap();
            let strict = decode_image(&bytes).unwrap();
            assert_eq!(strict.color(), lenient.color(), "{name}");
            assert_eq!(strict.to_rgb8(), lenient.to_rgb8(), "{name}");
        }
        let bytes = std::fs::read(dir.join("corrupt_scan.jpg")).unwrap();
        assert!(image::load_from_memory(&bytes).is_ok(), "the lenient decoder takes it");
        let problem = decode_image(&bytes).unwrap_err();
        assert!(matches!(problem, ImageProblem::Decode { format: "JPEG", .. }), "{problem:?}");
        let said = crate::error_chain(&problem);
        assert!(said.contains("the JPEG decoder failed") && said.contains("marker"), "{said}");
    }

    #[test]
    fn usable_images_decode_and_each_kind_of_fault_is_named() {
        assert_eq!(decode_image(&png(3, 2)).unwrap().width(), 3);
        assert_eq!(decode_image(&jpeg()).unwrap().height(), 16);
        assert!(matches!(decode_image(b"plain text, not an image"), Err(ImageProblem::Format(_))));
        assert!(matches!(decode_image(b""), Err(ImageProblem::Empty)));
        let cut = jpeg();
        let cut = &cut[..cut.len() - 40];
        assert!(matches!(decode_image(cut), Err(ImageProblem::Truncated { format: "JPEG", .. })));
        let mut broken = png(8, 8);
        let n = broken.len();
        broken[n / 2..n - 12].iter_mut().for_each(|b| *b = 0x5A);
        assert!(
            matches!(decode_image(&broken), Err(ImageProblem::Decode { format: "PNG", .. })),
            "{:?}",
            decode_image(&broken)
        );
    }
}
