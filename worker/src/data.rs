//! Real images in, model-ready tensors out: ImageFolder listing, decoding (JPEG/PNG, RGB or
//! grayscale) and the reference preprocessing — ADM `center_crop_arr` (PIL BOX halving while the
//! short side is ≥ 2S, PIL BICUBIC resize so the short side is S, centre crop), `ToTensor`,
//! `Normalize(0.5, 0.5)`.
//!
//! The resampler re-implements Pillow's separable convolution (float coefficients normalised to
//! 22-bit fixed point, horizontal pass then vertical pass, 8-bit intermediate) so crops match PIL
//! on identical decoded pixels. Deviation from the reference: no random horizontal flip, so modes
//! are deterministic. JPEG decoders may differ from libjpeg by a grey level or two.

use std::path::{Path, PathBuf};

pub use mgd3_common::imagefolder;

use futures::{StreamExt, TryStreamExt};
use image::{DynamicImage, GrayImage, RgbImage};
use mgd3_common::imagefolder::{ClassListing, ImageRef, ImageSource, ListError, Root};
use ndarray::{Array3, Array4, Axis};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum DataError {
    #[error(transparent)]
    List(#[from] ListError),
    #[error("class `{class}`: {found} images but IPC = {ipc} needs at least {ipc}")]
    TooFewImages { class: String, found: usize, ipc: usize },
    #[error("cannot decode image `{path}`: {source}")]
    Decode {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
    #[error(
        "image `{path}` is truncated: the {format} data ends before the image does ({bytes} bytes); replace or remove the file"
    )]
    Truncated { path: PathBuf, format: &'static str, bytes: usize },
    #[error("cannot read image `{path}`: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("dataset `{url}`: {problem}")]
    Dataset { url: String, problem: String },
    #[error("class `{class}`: reading dataset `{url}`: {source}")]
    Store {
        class: String,
        url: String,
        #[source]
        source: object_store::Error,
    },
    #[error("image `{path}` is empty ({width}×{height})")]
    Degenerate { path: PathBuf, width: u32, height: u32 },
}

/// True when a JPEG's entropy-coded data ends with the end-of-image marker. Decoders fill a
/// JPEG cut short with grey without an error (PIL refuses it: "image file is truncated"); inside
/// the scan data a 0xFF byte is always stuffed or a restart marker, so an EOI after the first
/// start-of-scan marks a complete image.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let Some(scan) = bytes.windows(2).position(|w| w == [0xFF, 0xDA]) else {
        return false;
    };
    bytes[scan..].windows(2).any(|w| w == [0xFF, 0xD9])
}

/// Decodes image bytes into 8-bit RGB (`channels == 3`) or luma (`channels == 1`). An image that
/// does not decode completely is an error naming the file, for every format read: the other
/// decoders fail on missing data themselves, JPEG is checked for its end marker.
pub fn decode(bytes: &[u8], path: &Path, channels: usize) -> Result<Pixels, DataError> {
    let format = image::guess_format(bytes).map_err(|source| DataError::Decode { path: path.into(), source })?;
    if format == image::ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        return Err(DataError::Truncated { path: path.into(), format: "JPEG", bytes: bytes.len() });
    }
    let image = image::load_from_memory_with_format(bytes, format)
        .map_err(|source| DataError::Decode { path: path.into(), source })?;
    if image.width() == 0 || image.height() == 0 {
        return Err(DataError::Degenerate { path: path.into(), width: image.width(), height: image.height() });
    }
    Ok(Pixels::from_image(&image, channels))
}

/// Reads and decodes one file.
pub fn load(path: &Path, channels: usize) -> Result<Pixels, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Read { path: path.into(), source })?;
    decode(&bytes, path, channels)
}

/// Encoded images fetched at once per chunk: bounds both the requests in flight and memory.
pub const MAX_CONCURRENT_READS: usize = 16;

/// Where a job's real images come from: a local ImageFolder or one in an object store, listed by
/// the one rule of [`mgd3_common::imagefolder`].
#[derive(Clone, Debug)]
pub struct Dataset(Root);

/// Runs a future from synchronous code: on the current runtime's handle from a blocking thread
/// (`spawn_blocking`, where the engine runs), or on a small runtime of its own outside one.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle.block_on(future),
        Err(_) => tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(future),
    }
}

impl Dataset {
    /// A local path (or `file://` URL) or an object-store URL.
    pub fn open(url: &str) -> Result<Self, DataError> {
        Root::open(url).map(Dataset).map_err(|e| DataError::Dataset { url: url.into(), problem: e.to_string() })
    }

    pub fn url(&self) -> String {
        self.0.url()
    }

    /// The class's images in the listing rule's order, and what the listing skipped.
    pub fn list_class(&self, class: &str) -> Result<ClassListing, DataError> {
        let listing = block_on(self.0.list_class(class))?;
        if listing.skipped.total() > 0 {
            tracing::info!(class, hidden = listing.skipped.hidden, not_images = listing.skipped.not_images,
                examples = ?listing.skipped.examples, "skipped entries that are not images of the class");
        }
        Ok(listing)
    }

    /// The bytes of `images`, in order, with at most [`MAX_CONCURRENT_READS`] reads in flight,
    /// each read from exactly the path or key the listing gave.
    pub fn read(&self, class: &str, images: &[ImageRef]) -> Result<Vec<Vec<u8>>, DataError> {
        match &self.0 {
            Root::Local(_) => images
                .iter()
                .map(|i| match &i.source {
                    ImageSource::Local(path) => {
                        std::fs::read(path).map_err(|source| DataError::Read { path: path.clone(), source })
                    }
                    ImageSource::Store(_) => unreachable!("a local listing gives local paths"),
                })
                .collect(),
            Root::Store(location) => {
                let reads = images.iter().map(|i| {
                    let store = location.store.clone();
                    let key = match &i.source {
                        ImageSource::Store(key) => key.clone(),
                        ImageSource::Local(_) => unreachable!("a store listing gives keys"),
                    };
                    async move { mgd3_common::store::get_bytes(store.as_ref(), &key).await.map(|b| b.to_vec()) }
                });
                block_on(futures::stream::iter(reads).buffered(MAX_CONCURRENT_READS).try_collect::<Vec<_>>())
                    .map_err(|source| DataError::Store { class: class.into(), url: self.url(), source })
            }
        }
    }
}

/// Interleaved 8-bit pixels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pixels {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<u8>,
}

impl Pixels {
    pub fn from_image(image: &DynamicImage, channels: usize) -> Self {
        let (width, height) = (image.width() as usize, image.height() as usize);
        let data = if channels == 1 { image.to_luma8().into_raw() } else { image.to_rgb8().into_raw() };
        Pixels { width, height, channels, data }
    }

    pub fn to_image(&self) -> DynamicImage {
        let (w, h) = (self.width as u32, self.height as u32);
        if self.channels == 1 {
            DynamicImage::ImageLuma8(GrayImage::from_raw(w, h, self.data.clone()).expect("size"))
        } else {
            DynamicImage::ImageRgb8(RgbImage::from_raw(w, h, self.data.clone()).expect("size"))
        }
    }

    fn crop(&self, x0: usize, y0: usize, w: usize, h: usize) -> Pixels {
        let c = self.channels;
        let mut data = Vec::with_capacity(w * h * c);
        for y in y0..y0 + h {
            let start = (y * self.width + x0) * c;
            data.extend_from_slice(&self.data[start..start + w * c]);
        }
        Pixels { width: w, height: h, channels: c, data }
    }
}

#[derive(Clone, Copy)]
enum Filter {
    Box,
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Box => 0.5,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`: per output pixel, the first input
/// index and fixed-point weights.
fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let inverse = 1.0 / filter_scale;
            // C casts truncate toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let weights: Vec<f64> = (xmin..xmax).map(|x| filter.weight((x as f64 - center + 0.5) * inverse)).collect();
            let total: f64 = weights.iter().sum();
            let fixed = weights
                .iter()
                .map(|w| {
                    let w = if total != 0.0 { w / total } else { *w };
                    let scaled = w * (1u32 << PRECISION_BITS) as f64;
                    if w < 0.0 { (scaled - 0.5) as i32 } else { (scaled + 0.5) as i32 }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's `Image.resize(size, filter)` for 8-bit images: horizontal pass, then vertical.
fn resize(src: &Pixels, width: usize, height: usize, filter: Filter) -> Pixels {
    let c = src.channels;
    let mut current = src.clone();
    if width != src.width {
        let coeffs = coefficients(src.width, width, filter);
        let mut data = vec![0u8; width * current.height * c];
        for y in 0..current.height {
            let row = &current.data[y * current.width * c..(y + 1) * current.width * c];
            for (xx, (xmin, weights)) in coeffs.iter().enumerate() {
                for ch in 0..c {
                    let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                    for (k, w) in weights.iter().enumerate() {
                        acc += row[(xmin + k) * c + ch] as i64 * *w as i64;
                    }
                    data[(y * width + xx) * c + ch] = clip8(acc);
                }
            }
        }
        current = Pixels { width, height: current.height, channels: c, data };
    }
    if height != src.height {
        let coeffs = coefficients(src.height, height, filter);
        let stride = current.width * c;
        let mut data = vec![0u8; stride * height];
        for (yy, (ymin, weights)) in coeffs.iter().enumerate() {
            for i in 0..stride {
                let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                for (k, w) in weights.iter().enumerate() {
                    acc += current.data[(ymin + k) * stride + i] as i64 * *w as i64;
                }
                data[yy * stride + i] = clip8(acc);
            }
        }
        current = Pixels { width: current.width, height, channels: c, data };
    }
    current
}

/// Python's `round()` for the positive sizes of `center_crop_arr`.
fn round_half_even(x: f64) -> usize {
    let r = x.round();
    (if (x - x.trunc()) == 0.5 { 2.0 * (x / 2.0).round() } else { r }) as usize
}

/// ADM's `center_crop_arr(image, size)`.
pub fn center_crop(image: &Pixels, size: usize) -> Pixels {
    let mut current = image.clone();
    while current.width.min(current.height) >= 2 * size {
        current = resize(&current, current.width / 2, current.height / 2, Filter::Box);
    }
    let scale = size as f64 / current.width.min(current.height) as f64;
    let (w, h) = (
        round_half_even(current.width as f64 * scale).max(size),
        round_half_even(current.height as f64 * scale).max(size),
    );
    let resized = resize(&current, w, h, Filter::Bicubic);
    resized.crop((w - size) / 2, (h - size) / 2, size, size)
}

/// `ToTensor` + `Normalize(0.5, 0.5)`: [c, S, S] in [-1, 1].
pub fn to_tensor(pixels: &Pixels) -> Array3<f32> {
    let (c, h, w) = (pixels.channels, pixels.height, pixels.width);
    Array3::from_shape_fn((c, h, w), |(ch, y, x)| {
        let v = pixels.data[(y * w + x) * c + ch] as f32 / 255.0;
        (v - 0.5) / 0.5
    })
}

/// Stacks preprocessed images into a batch [B, c, S, S].
pub fn stack(tensors: &[Array3<f32>]) -> Array4<f32> {
    let views: Vec<_> = tensors.iter().map(|t| t.view().insert_axis(Axis(0))).collect();
    ndarray::concatenate(Axis(0), &views).expect("equal shapes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(width: usize, height: usize, channels: usize) -> Pixels {
        let data = (0..width * height * channels)
            .map(|k| {
                let (p, ch) = (k / channels, k % channels);
                let (x, y) = (p % width, p / width);
                ((x * 7 + y * 3 + ch * 50) % 256) as u8
            })
            .collect();
        Pixels { width, height, channels, data }
    }

    #[test]
    fn box_halving_averages_two_by_two_blocks() {
        let img = Pixels { width: 4, height: 2, channels: 1, data: vec![0, 2, 10, 20, 4, 6, 30, 40] };
        let half = resize(&img, 2, 1, Filter::Box);
        assert_eq!(half.data, vec![3, 25]);
    }

    #[test]
    fn resizing_to_the_same_size_is_identity_and_constant_images_stay_constant() {
        let img = gradient(13, 9, 3);
        assert_eq!(resize(&img, 13, 9, Filter::Bicubic), img);
        let flat = Pixels { width: 37, height: 23, channels: 3, data: vec![117; 37 * 23 * 3] };
        for (w, h) in [(16, 16), (50, 31), (5, 3)] {
            assert!(resize(&flat, w, h, Filter::Bicubic).data.iter().all(|v| *v == 117));
        }
    }

    #[test]
    fn bicubic_weights_sum_to_one_in_fixed_point() {
        for (input, output) in [(500, 256), (256, 341), (7, 3), (3, 7)] {
            for (_, weights) in coefficients(input, output, Filter::Bicubic) {
                let total: i64 = weights.iter().map(|w| *w as i64).sum();
                assert!((total - (1 << PRECISION_BITS)).abs() <= weights.len() as i64);
            }
        }
    }

    #[test]
    fn center_crop_follows_adm() {
        // 1000×600 → BOX halving once (500×300, short side ≥ 2·128 → no, 300 < 256 stops),
        // then bicubic so the short side is 128, then a centred 128×128 crop.
        let img = gradient(1000, 600, 3);
        let out = center_crop(&img, 128);
        assert_eq!((out.width, out.height, out.channels), (128, 128, 3));
        let small = gradient(20, 10, 1);
        let out = center_crop(&small, 16);
        assert_eq!((out.width, out.height), (16, 16));
    }

    #[test]
    fn to_tensor_maps_bytes_to_minus_one_one() {
        let px = Pixels { width: 2, height: 1, channels: 1, data: vec![0, 255] };
        let t = to_tensor(&px);
        assert_eq!(t[[0, 0, 0]], -1.0);
        assert_eq!(t[[0, 0, 1]], 1.0);
    }

    /// Every format read (torchvision's extensions, through the `image` crate): the whole file
    /// decodes, and the same file cut anywhere from 10 % to 95 % is an error naming it, never
    /// an image padded with grey.
    #[test]
    fn a_truncated_image_of_any_format_is_an_error_naming_the_file() {
        use image::ImageFormat;
        let mut rng = 12345u32;
        let img = RgbImage::from_fn(96, 80, |x, y| {
            rng = rng.wrapping_mul(1_103_515_245).wrapping_add(12345);
            image::Rgb([(x * 2) as u8, (y * 3) as u8, (rng >> 24) as u8])
        });
        let formats = [
            (ImageFormat::Jpeg, "a.jpg"),
            (ImageFormat::Png, "a.png"),
            (ImageFormat::Bmp, "a.bmp"),
            (ImageFormat::WebP, "a.webp"),
            (ImageFormat::Tiff, "a.tif"),
            (ImageFormat::Pnm, "a.ppm"),
        ];
        for (format, name) in formats {
            let mut bytes = std::io::Cursor::new(Vec::new());
            DynamicImage::ImageRgb8(img.clone()).write_to(&mut bytes, format).unwrap();
            let bytes = bytes.into_inner();
            let whole = decode(&bytes, Path::new(name), 3).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!((whole.width, whole.height), (96, 80), "{name}");
            for percent in [10, 25, 50, 75, 90, 95] {
                let cut = &bytes[..bytes.len() * percent / 100];
                let error = match decode(cut, Path::new(name), 3) {
                    Ok(_) => panic!("{name} cut to {percent} % decoded without an error"),
                    Err(e) => e.to_string(),
                };
                assert!(error.contains(name), "{name} at {percent} %: {error}");
            }
        }
    }

    #[test]
    fn listing_is_sorted_and_errors_name_the_class() {
        let dir = tempfile::tempdir().unwrap();
        let class = dir.path().join("n001");
        std::fs::create_dir(&class).unwrap();
        let dataset = Dataset::open(&dir.path().display().to_string()).unwrap();
        assert!(matches!(dataset.list_class("n001"), Err(DataError::List(ListError::EmptyClass { .. }))));
        for name in ["b.png", "a.JPG", "c.txt"] {
            std::fs::write(class.join(name), b"x").unwrap();
        }
        let listing = dataset.list_class("n001").unwrap();
        let names: Vec<_> = listing.images.iter().map(|f| f.relative.as_str()).collect();
        assert_eq!(names, ["a.JPG", "b.png"]);
        assert_eq!((listing.skipped.not_images, listing.skipped.examples.clone()), (1, vec!["c.txt".to_owned()]));
        let err = dataset.list_class("n999").unwrap_err();
        assert!(err.to_string().contains("n999"), "{err}");
        let err = load(&class.join("a.JPG"), 3).unwrap_err();
        assert!(err.to_string().contains("a.JPG"), "{err}");
    }
}
