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

/// Checks a class's listing against the one its job recorded for it (`class.listing`; jobs
/// submitted before listings were recorded are not checked). Other names or sizes fail the
/// class, until `--accept-data-changes` records the data as it is; the same names and sizes with other versions (modification or change times, ETags) are the same
/// data copied without its times, such as a dataset staged to node-local scratch with `cp -r`,
/// and are used, with a warning; true is returned then, for the class's marker.
///
/// # Errors
/// [`DataError::Changed`], naming the class and what it was and is.
pub fn check_unchanged(class: &mgd3_common::job::ClassRef, listing: &ClassListing) -> Result<bool, DataError> {
    let Some(submitted) = &class.listing else { return Ok(false) };
    let now = listing.summary();
    if now.names_digest != submitted.names_digest {
        return Err(DataError::Changed {
            class: class.wnid.clone(),
            submitted: Box::new(submitted.clone()),
            now: Box::new(now),
        });
    }
    if now.digest != submitted.digest {
        tracing::warn!(
            class = %class.wnid,
            "the class's files have the same names and sizes as at submit but other file times or ETags \
             (a copy of the dataset, or files rewritten in place with the same size): distilling them; the \
             class's marker records it (versions_changed)"
        );
        return Ok(true);
    }
    Ok(false)
}

/// What to do about a real image that cannot be used, said with each such error: the way back
/// from a corrupt file that keeps every other class's commit.
pub const UNREADABLE_IMAGE_FIX: &str = "remove or replace the file, then run the same command again with \
    --accept-data-changes (MGD3_ACCEPT_DATA_CHANGES=1 for distill.sbatch): only this class is distilled again; \
    `coordinator check JOB.toml --decode` finds every such file at once";

/// Errors of reading real images.
#[derive(Debug, Error)]
pub enum DataError {
    /// Listing a class failed (see [`ListError`]).
    #[error(transparent)]
    List(#[from] ListError),
    /// The class's images are not the ones the job was submitted with (files added, removed,
    /// renamed or resized since): distilling them would put other data under the job's
    /// fingerprint.
    #[error(
        "class `{class}` changed since the job recorded it: {submitted} then, {now} now{}; to distil the class \
         from its files as they are now (every other class's commit is kept), run the same `coordinator run` or \
         `submit` again with --accept-data-changes (or `coordinator resume JOB --accept-data-changes` while a \
         coordinator serves the job), or restore the class's files (names and sizes; modification times do not \
         matter) and, once the job has failed over it, run the same command again with --retry-failed",
        if submitted.images == now.images && submitted.bytes == now.bytes {
            " (as many images and bytes: files were renamed, or replaced by others of the same total size)"
        } else {
            ""
        }
    )]
    Changed {
        /// The class folder name.
        class: String,
        /// The listing submit recorded.
        submitted: Box<mgd3_common::imagefolder::ListingSummary>,
        /// The listing now.
        now: Box<mgd3_common::imagefolder::ListingSummary>,
    },
    /// A file listed as an image is larger than any image mgd3 reads ([`MAX_IMAGE_BYTES`]): a
    /// sparse or misnamed file, read whole, would exhaust the worker's memory.
    #[error(
        "`{path}` is {bytes} bytes, more than the {max} bytes mgd3 reads for one image; remove it from the class or \
         convert it to a compressed image format"
    )]
    TooLarge {
        /// The file's path or key.
        path: PathBuf,
        /// Its size.
        bytes: u64,
        /// [`MAX_IMAGE_BYTES`].
        max: u64,
    },
    /// A class holds fewer images than IPC, so k-means cannot find IPC modes.
    #[error("class `{class}`: {found} images but IPC = {ipc} needs at least {ipc}")]
    TooFewImages {
        /// The class folder name.
        class: String,
        /// Images the listing found.
        found: usize,
        /// Images per class asked for.
        ipc: usize,
    },
    /// The bytes are not an image of a known format, or the decoder failed.
    #[error("cannot decode image `{path}` ({UNREADABLE_IMAGE_FIX})")]
    Decode {
        /// The image's path or key.
        path: PathBuf,
        /// The decoder's error.
        #[source]
        source: image::ImageError,
    },
    /// A JPEG without its end-of-image marker after the scan data (decoders would fill it with
    /// grey; PIL refuses it).
    #[error(
        "image `{path}` is truncated: the {format} data ends before the image does ({bytes} bytes); {UNREADABLE_IMAGE_FIX}"
    )]
    Truncated {
        /// The image's path or key.
        path: PathBuf,
        /// The format (`JPEG`).
        format: &'static str,
        /// Size of the file in bytes.
        bytes: usize,
    },
    /// An image file of no bytes (a copy that never happened), said as `check --decode` says it.
    #[error("image `{path}` is an empty file (0 bytes); {UNREADABLE_IMAGE_FIX}")]
    Empty {
        /// The image's path or key.
        path: PathBuf,
    },
    /// A local image file cannot be read.
    #[error("cannot read image `{path}`")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The dataset root cannot be opened (an invalid URL, a store that cannot be built).
    #[error("dataset `{url}`: {problem}")]
    Dataset {
        /// The dataset's path or URL.
        url: String,
        /// What went wrong.
        problem: String,
    },
    /// Reading an image from an object store failed (after the store's retries).
    #[error("class `{class}`: reading dataset `{url}`")]
    Store {
        /// The class being read.
        class: String,
        /// The dataset's URL.
        url: String,
        /// The store's error.
        #[source]
        source: object_store::Error,
    },
    /// An image that decodes to zero width or height.
    #[error("image `{path}` is empty ({width}×{height}); {UNREADABLE_IMAGE_FIX}")]
    Degenerate {
        /// The image's path or key.
        path: PathBuf,
        /// Decoded width in pixels.
        width: u32,
        /// Decoded height in pixels.
        height: u32,
    },
}

/// Decodes image bytes into 8-bit RGB (`channels == 3`) or luma (`channels == 1`) through
/// [`mgd3_common::imagecheck::decode_image`] (the test `coordinator check --decode` runs): an
/// image that does not decode completely is an error naming the file, for every format read.
/// `path` only names the image in errors.
///
/// # Errors
/// [`DataError::Decode`] for an unknown format or a decoder failure, [`DataError::Empty`] for no
/// bytes, [`DataError::Truncated`] for a JPEG cut short, [`DataError::Degenerate`] for a
/// zero-sized image.
pub fn decode(bytes: &[u8], path: &Path, channels: usize) -> Result<Pixels, DataError> {
    use mgd3_common::imagecheck::ImageProblem;
    let image = mgd3_common::imagecheck::decode_image(bytes).map_err(|problem| match problem {
        ImageProblem::Format(source) | ImageProblem::Decode { source, .. } => {
            DataError::Decode { path: path.into(), source }
        }
        ImageProblem::Empty => DataError::Empty { path: path.into() },
        ImageProblem::Truncated { format, bytes } => DataError::Truncated { path: path.into(), format, bytes },
        ImageProblem::Degenerate { width, height } => DataError::Degenerate { path: path.into(), width, height },
    })?;
    Ok(Pixels::from_image(image, channels))
}

/// Reads and decodes one local file (see [`decode`]).
///
/// # Errors
/// [`DataError::Read`] when the file cannot be read; those of [`decode`].
pub fn load(path: &Path, channels: usize) -> Result<Pixels, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Read { path: path.into(), source })?;
    decode(&bytes, path, channels)
}

/// Encoded images fetched at once per chunk: bounds both the requests in flight and memory.
pub const MAX_CONCURRENT_READS: usize = 16;

pub use mgd3_common::imagecheck::MAX_IMAGE_BYTES;

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
    ///
    /// # Errors
    /// [`DataError::Dataset`] when the URL cannot be opened.
    pub fn open(url: &str) -> Result<Self, DataError> {
        Root::open(url)
            .map(Dataset)
            .map_err(|e| DataError::Dataset { url: url.into(), problem: mgd3_common::error_chain(&e) })
    }

    /// The dataset root as a path or URL, for messages and cache keys.
    pub fn url(&self) -> String {
        self.0.url()
    }

    /// The class's images in the listing rule's order, and what the listing skipped.
    ///
    /// # Errors
    /// [`DataError::List`] when the class folder is missing, holds no images or cannot be listed.
    pub fn list_class(&self, class: &str) -> Result<ClassListing, DataError> {
        let listing = block_on(self.0.list_class(class))?;
        if listing.skipped.links > 0 {
            tracing::info!(class, links = listing.skipped.links, "{}", listing.skipped.describe_links());
        }
        if listing.skipped.hidden + listing.skipped.not_images > 0 {
            tracing::info!(class, hidden = listing.skipped.hidden, not_images = listing.skipped.not_images,
                examples = ?listing.skipped.examples, "skipped entries that are not images of the class");
        }
        Ok(listing)
    }

    /// The bytes of `images`, in order, with at most [`MAX_CONCURRENT_READS`] reads in flight,
    /// each read from exactly the path or key the listing gave.
    ///
    /// # Errors
    /// [`DataError::Read`] for a local file, [`DataError::Store`] for an object that cannot be
    /// read.
    pub fn read(&self, class: &str, images: &[ImageRef]) -> Result<Vec<Vec<u8>>, DataError> {
        let too_large =
            |path: String, bytes: u64| DataError::TooLarge { path: path.into(), bytes, max: MAX_IMAGE_BYTES };
        if let Some(large) = images.iter().find(|i| i.bytes > MAX_IMAGE_BYTES) {
            return Err(too_large(large.display(), large.bytes));
        }
        match &self.0 {
            Root::Local(_) => images
                .iter()
                .map(|i| match &i.source {
                    ImageSource::Local(path) => {
                        // Never more than the cap, whatever the file became since it was listed.
                        let read = |path: &Path| -> std::io::Result<Vec<u8>> {
                            let mut bytes = Vec::new();
                            std::io::Read::read_to_end(
                                &mut std::io::Read::take(std::fs::File::open(path)?, MAX_IMAGE_BYTES + 1),
                                &mut bytes,
                            )?;
                            Ok(bytes)
                        };
                        let bytes = read(path).map_err(|source| DataError::Read { path: path.clone(), source })?;
                        if bytes.len() as u64 > MAX_IMAGE_BYTES {
                            return Err(too_large(path.display().to_string(), bytes.len() as u64));
                        }
                        Ok(bytes)
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
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Channels per pixel: 1 (luma) or 3 (RGB).
    pub channels: usize,
    /// Row-major pixels, `channels` bytes each (`width × height × channels` in all).
    pub data: Vec<u8>,
}

impl Pixels {
    /// The image as `channels` (1: luma, else RGB) interleaved bytes, without a copy when it
    /// already is.
    pub fn from_image(image: DynamicImage, channels: usize) -> Self {
        let (width, height) = (image.width() as usize, image.height() as usize);
        let data = if channels == 1 { image.into_luma8().into_raw() } else { image.into_rgb8().into_raw() };
        Pixels { width, height, channels, data }
    }

    /// The pixels as an `image` crate image (luma for 1 channel, else RGB), copied.
    ///
    /// # Panics
    /// If `data` holds fewer than `width × height × channels` bytes.
    pub fn to_image(&self) -> DynamicImage {
        let (w, h) = (self.width as u32, self.height as u32);
        if self.channels == 1 {
            DynamicImage::ImageLuma8(GrayImage::from_raw(w, h, self.data.clone()).expect("size"))
        } else {
            DynamicImage::ImageRgb8(RgbImage::from_raw(w, h, self.data.clone()).expect("size"))
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
/// Pillow's rounding offset, the accumulator's start value.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for one axis: per output pixel, the
/// first input index, the number of taps and `taps` fixed-point weights (zero-padded).
struct Coefficients {
    first: Vec<usize>,
    len: Vec<usize>,
    taps: usize,
    weights: Vec<i32>,
}

impl Coefficients {
    fn new(in_size: usize, out_size: usize, filter: Filter) -> Self {
        let scale = in_size as f64 / out_size as f64;
        let filter_scale = scale.max(1.0);
        let support = filter.support() * filter_scale;
        // Pillow's `ksize`: the most taps any output pixel can have.
        let taps = support.ceil() as usize * 2 + 1;
        let inverse = 1.0 / filter_scale;
        let mut coefficients =
            Coefficients { first: vec![0; out_size], len: vec![0; out_size], taps, weights: vec![0; out_size * taps] };
        let mut raw = Vec::with_capacity(taps);
        for xx in 0..out_size {
            let center = (xx as f64 + 0.5) * scale;
            // C casts truncate toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            raw.clear();
            raw.extend((xmin..xmax).map(|x| filter.weight((x as f64 - center + 0.5) * inverse)));
            let total: f64 = raw.iter().sum();
            for (slot, w) in coefficients.weights[xx * taps..].iter_mut().zip(&raw) {
                let w = if total != 0.0 { w / total } else { *w };
                let scaled = w * (1u32 << PRECISION_BITS) as f64;
                *slot = if w < 0.0 { (scaled - 0.5) as i32 } else { (scaled + 0.5) as i32 };
            }
            coefficients.first[xx] = xmin;
            coefficients.len[xx] = raw.len();
        }
        coefficients
    }

    fn weights(&self, out: usize) -> &[i32] {
        &self.weights[out * self.taps..out * self.taps + self.len[out]]
    }
}

/// Pillow's `clip8`: the fixed-point sum back to a byte.
#[inline(always)]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Horizontal pass over `rows` of `src` (`width` pixels of `C` channels each): output columns
/// `cols` of the resampled row, written densely to `out`. Pillow's `ImagingResampleHorizontal_8bpc`
/// (same products, same i32 sums, same order), restricted to the columns asked for.
#[inline(always)]
fn horizontal_body<const C: usize>(
    src: &[u8],
    width: usize,
    rows: std::ops::Range<usize>,
    coefficients: &Coefficients,
    cols: std::ops::Range<usize>,
    out: &mut [u8],
) {
    let out_stride = cols.len() * C;
    for (row, out_row) in
        src[rows.start * width * C..rows.end * width * C].chunks_exact(width * C).zip(out.chunks_exact_mut(out_stride))
    {
        for (xx, out_px) in cols.clone().zip(out_row.chunks_exact_mut(C)) {
            let first = coefficients.first[xx];
            let weights = coefficients.weights(xx);
            let mut acc = [HALF; C];
            for (px, &w) in row[first * C..(first + weights.len()) * C].chunks_exact(C).zip(weights) {
                for ch in 0..C {
                    acc[ch] += px[ch] as i32 * w;
                }
            }
            for ch in 0..C {
                out_px[ch] = clip8(acc[ch]);
            }
        }
    }
}

/// Vertical pass: output rows `rows` of the resampled image from `src` (`stride` bytes a row,
/// whose first row is input row `src_first`). Pillow's `ImagingResampleVertical_8bpc`, computed
/// a whole row at a time so that the byte loop vectorises; every value is the same sum.
#[inline(always)]
fn vertical_body(
    src: &[u8],
    stride: usize,
    src_first: usize,
    coefficients: &Coefficients,
    rows: std::ops::Range<usize>,
    out: &mut [u8],
    acc: &mut Vec<i32>,
) {
    acc.resize(stride, 0);
    for (yy, out_row) in rows.zip(out.chunks_exact_mut(stride)) {
        acc.fill(HALF);
        let first = coefficients.first[yy] - src_first;
        for (k, &w) in coefficients.weights(yy).iter().enumerate() {
            let row = &src[(first + k) * stride..(first + k + 1) * stride];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += p as i32 * w;
            }
        }
        for (o, &a) in out_row.iter_mut().zip(acc.iter()) {
            *o = clip8(a);
        }
    }
}

/// The kernels, compiled for the baseline CPU and, on x86-64, again for AVX2 (chosen at run
/// time): integer maths only, so both give the same bytes.
mod kernels {
    use super::*;

    pub(super) fn horizontal(
        channels: usize,
        src: &[u8],
        width: usize,
        rows: std::ops::Range<usize>,
        coefficients: &Coefficients,
        cols: std::ops::Range<usize>,
        out: &mut [u8],
    ) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { horizontal_avx2(channels, src, width, rows, coefficients, cols, out) };
        }
        horizontal_any(channels, src, width, rows, coefficients, cols, out)
    }

    #[inline(always)]
    fn horizontal_any(
        channels: usize,
        src: &[u8],
        width: usize,
        rows: std::ops::Range<usize>,
        coefficients: &Coefficients,
        cols: std::ops::Range<usize>,
        out: &mut [u8],
    ) {
        match channels {
            1 => horizontal_body::<1>(src, width, rows, coefficients, cols, out),
            3 => horizontal_body::<3>(src, width, rows, coefficients, cols, out),
            4 => horizontal_body::<4>(src, width, rows, coefficients, cols, out),
            other => unreachable!("{other} channels"),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn horizontal_avx2(
        channels: usize,
        src: &[u8],
        width: usize,
        rows: std::ops::Range<usize>,
        coefficients: &Coefficients,
        cols: std::ops::Range<usize>,
        out: &mut [u8],
    ) {
        horizontal_any(channels, src, width, rows, coefficients, cols, out)
    }

    pub(super) fn vertical(
        src: &[u8],
        stride: usize,
        src_first: usize,
        coefficients: &Coefficients,
        rows: std::ops::Range<usize>,
        out: &mut [u8],
        acc: &mut Vec<i32>,
    ) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { vertical_avx2(src, stride, src_first, coefficients, rows, out, acc) };
        }
        vertical_body(src, stride, src_first, coefficients, rows, out, acc)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn vertical_avx2(
        src: &[u8],
        stride: usize,
        src_first: usize,
        coefficients: &Coefficients,
        rows: std::ops::Range<usize>,
        out: &mut [u8],
        acc: &mut Vec<i32>,
    ) {
        vertical_body(src, stride, src_first, coefficients, rows, out, acc)
    }
}

/// A window of an image resampled to `width` × `height`: columns `x0..x0 + w`, rows
/// `y0..y0 + h`.
#[derive(Clone, Copy, Debug)]
struct Window {
    x0: usize,
    y0: usize,
    w: usize,
    h: usize,
}

/// Pillow's `Image.resize((width, height), filter)` for 8-bit images (horizontal pass, 8-bit
/// intermediate, vertical pass), computing only `window` of the result. Each output pixel
/// depends only on its own coefficients, so the window equals the same crop of the whole
/// resize, byte for byte, at a fraction of the work.
fn resize_window(src: &Pixels, width: usize, height: usize, filter: Filter, window: Window) -> Pixels {
    let c = src.channels;
    let Window { x0, y0, w, h } = window;
    debug_assert!(x0 + w <= width && y0 + h <= height);
    let vertical = (height != src.height).then(|| Coefficients::new(src.height, height, filter));
    // The input rows the vertical pass reads (or the window's rows when there is none).
    let rows = match &vertical {
        Some(v) if h > 0 => v.first[y0]..(y0..y0 + h).map(|y| v.first[y] + v.len[y]).max().unwrap_or(0),
        Some(_) => 0..0,
        None => y0..y0 + h,
    };
    let horizontal_out = if width != src.width {
        let coefficients = Coefficients::new(src.width, width, filter);
        let mut out = vec![0u8; rows.len() * w * c];
        kernels::horizontal(c, &src.data, src.width, rows.clone(), &coefficients, x0..x0 + w, &mut out);
        out
    } else {
        let mut out = Vec::with_capacity(rows.len() * w * c);
        for y in rows.clone() {
            out.extend_from_slice(&src.data[(y * src.width + x0) * c..(y * src.width + x0 + w) * c]);
        }
        out
    };
    let data = match &vertical {
        Some(coefficients) => {
            let mut out = vec![0u8; h * w * c];
            let mut acc = Vec::new();
            kernels::vertical(&horizontal_out, w * c, rows.start, coefficients, y0..y0 + h, &mut out, &mut acc);
            out
        }
        None => horizontal_out,
    };
    Pixels { width: w, height: h, channels: c, data }
}

/// Pillow's `Image.resize(size, filter)` for 8-bit images: horizontal pass, then vertical.
fn resize(src: &Pixels, width: usize, height: usize, filter: Filter) -> Pixels {
    resize_window(src, width, height, filter, Window { x0: 0, y0: 0, w: width, h: height })
}

/// Python's `round()` (half to even) for the positive sizes of `center_crop_arr`.
fn round_size(x: f64) -> usize {
    crate::mgd3::schedule::round_half_even(x) as usize
}

/// ADM's `center_crop_arr(image, size)`: BOX halving while the short side is ≥ 2·size, BICUBIC
/// resize so that the short side is `size`, centred `size` × `size` crop. Only the crop is
/// resampled (see `resize_window`); the bytes are those of the whole resize, then cropped.
pub fn center_crop(image: &Pixels, size: usize) -> Pixels {
    let mut halved: Option<Pixels> = None;
    loop {
        let current = halved.as_ref().unwrap_or(image);
        if current.width.min(current.height) < 2 * size {
            break;
        }
        halved = Some(resize(current, current.width / 2, current.height / 2, Filter::Box));
    }
    let current = halved.as_ref().unwrap_or(image);
    let scale = size as f64 / current.width.min(current.height) as f64;
    let (w, h) =
        (round_size(current.width as f64 * scale).max(size), round_size(current.height as f64 * scale).max(size));
    let window = Window { x0: (w - size) / 2, y0: (h - size) / 2, w: size, h: size };
    resize_window(current, w, h, Filter::Bicubic, window)
}

/// `ToTensor` + `Normalize(0.5, 0.5)` of one byte, exactly as the float maths of the reference.
fn normalise(v: u8) -> f32 {
    (v as f32 / 255.0 - 0.5) / 0.5
}

/// Writes `pixels` as `ToTensor` + `Normalize(0.5, 0.5)` into `out`, planar `[c, h, w]` in `[-1, 1]`.
///
/// # Panics
/// If `out` does not hold exactly c·h·w values.
pub fn write_tensor(pixels: &Pixels, out: &mut [f32]) {
    let (c, plane) = (pixels.channels, pixels.width * pixels.height);
    assert_eq!(out.len(), c * plane, "tensor buffer size");
    let table: [f32; 256] = std::array::from_fn(|v| normalise(v as u8));
    for (ch, plane_out) in out.chunks_exact_mut(plane).enumerate() {
        for (o, px) in plane_out.iter_mut().zip(pixels.data.chunks_exact(c)) {
            *o = table[px[ch] as usize];
        }
    }
}

/// `ToTensor` + `Normalize(0.5, 0.5)`: `[c, S, S]` in `[-1, 1]`.
pub fn to_tensor(pixels: &Pixels) -> Array3<f32> {
    let mut out = Array3::zeros((pixels.channels, pixels.height, pixels.width));
    write_tensor(pixels, out.as_slice_mut().expect("standard layout"));
    out
}

/// Stacks preprocessed images into a batch `[B, c, S, S]`.
pub fn stack(tensors: &[Array3<f32>]) -> Array4<f32> {
    let views: Vec<_> = tensors.iter().map(|t| t.view().insert_axis(Axis(0))).collect();
    ndarray::concatenate(Axis(0), &views).expect("equal shapes")
}

/// Decodes image bytes and preprocesses them the reference's way (`center_crop_arr(size)`,
/// `ToTensor`, `Normalize`) into `out` (`[channels, size, size]`, planar). Returns the 8-bit crop
/// (for contact sheets).
///
/// # Errors
/// Those of [`decode`], naming `path`.
pub fn preprocess_into(
    bytes: &[u8],
    path: &Path,
    channels: usize,
    size: usize,
    out: &mut [f32],
) -> Result<Pixels, DataError> {
    let crop = center_crop(&decode(bytes, path, channels)?, size);
    write_tensor(&crop, out);
    Ok(crop)
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

    /// Pillow's resampling written the plain way (whole image, i64 sums, per channel), as the
    /// reference the fast kernels must match byte for byte.
    fn plain_resize(src: &Pixels, width: usize, height: usize, filter: Filter) -> Pixels {
        let c = src.channels;
        let mut current = src.clone();
        if width != src.width {
            let co = Coefficients::new(src.width, width, filter);
            let mut data = vec![0u8; width * current.height * c];
            for y in 0..current.height {
                for xx in 0..width {
                    for ch in 0..c {
                        let mut acc: i64 = HALF as i64;
                        for (k, w) in co.weights(xx).iter().enumerate() {
                            acc += current.data[(y * current.width + co.first[xx] + k) * c + ch] as i64 * *w as i64;
                        }
                        data[(y * width + xx) * c + ch] = (acc >> PRECISION_BITS).clamp(0, 255) as u8;
                    }
                }
            }
            current = Pixels { width, height: current.height, channels: c, data };
        }
        if height != src.height {
            let co = Coefficients::new(src.height, height, filter);
            let stride = current.width * c;
            let mut data = vec![0u8; stride * height];
            for yy in 0..height {
                for i in 0..stride {
                    let mut acc: i64 = HALF as i64;
                    for (k, w) in co.weights(yy).iter().enumerate() {
                        acc += current.data[(co.first[yy] + k) * stride + i] as i64 * *w as i64;
                    }
                    data[yy * stride + i] = (acc >> PRECISION_BITS).clamp(0, 255) as u8;
                }
            }
            current = Pixels { width: current.width, height, channels: c, data };
        }
        current
    }

    fn noisy(width: usize, height: usize, channels: usize, seed: u32) -> Pixels {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        let data = (0..width * height * channels)
            .map(|k| {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                // Edges and noise: sharp steps make bicubic overshoot, so clipping is exercised.
                if (k / channels / 7).is_multiple_of(3) { 255 * ((state >> 30) & 1) as u8 } else { (state >> 24) as u8 }
            })
            .collect();
        Pixels { width, height, channels, data }
    }

    /// The windowed, vectorised resampler gives the bytes of the plain one, cropped, for up- and
    /// down-scaling, both filters, 1 and 3 channels, odd sizes and every window position.
    #[test]
    fn windowed_resize_matches_the_plain_resize_byte_for_byte() {
        let cases = [(500, 375, 341, 256), (375, 500, 256, 341), (640, 427, 384, 256), (33, 17, 70, 41), (9, 9, 4, 5)];
        for (seed, (iw, ih, ow, oh)) in cases.into_iter().enumerate() {
            for channels in [1, 3] {
                let img = noisy(iw, ih, channels, seed as u32);
                for filter in [Filter::Bicubic, Filter::Box] {
                    let whole = plain_resize(&img, ow, oh, filter);
                    assert_eq!(resize(&img, ow, oh, filter), whole, "{iw}x{ih} -> {ow}x{oh} {filter:?} c={channels}");
                    let (w, h) = (ow.min(oh), ow.min(oh));
                    for (x0, y0) in [(0, 0), ((ow - w) / 2, (oh - h) / 2), (ow - w, oh - h)] {
                        let window = resize_window(&img, ow, oh, filter, Window { x0, y0, w, h });
                        let mut want = Vec::new();
                        for y in y0..y0 + h {
                            want.extend_from_slice(&whole.data[(y * ow + x0) * channels..(y * ow + x0 + w) * channels]);
                        }
                        assert_eq!(window.data, want, "{iw}x{ih} -> {ow}x{oh} window at {x0},{y0}");
                    }
                }
            }
        }
    }

    /// `center_crop` equals ADM's steps done on whole images: halving, whole bicubic resize, crop.
    #[test]
    fn center_crop_equals_whole_resize_then_crop() {
        for (seed, (w, h, size)) in
            [(500, 375, 256), (1100, 700, 256), (256, 256, 256), (300, 900, 128)].into_iter().enumerate()
        {
            let img = noisy(w, h, 3, 100 + seed as u32);
            let mut current = img.clone();
            while current.width.min(current.height) >= 2 * size {
                current = plain_resize(&current, current.width / 2, current.height / 2, Filter::Box);
            }
            let scale = size as f64 / current.width.min(current.height) as f64;
            let (rw, rh) = (
                round_size(current.width as f64 * scale).max(size),
                round_size(current.height as f64 * scale).max(size),
            );
            let whole = plain_resize(&current, rw, rh, Filter::Bicubic);
            let (x0, y0) = ((rw - size) / 2, (rh - size) / 2);
            let mut want = Vec::new();
            for y in y0..y0 + size {
                want.extend_from_slice(&whole.data[(y * rw + x0) * 3..(y * rw + x0 + size) * 3]);
            }
            assert_eq!(center_crop(&img, size).data, want, "{w}x{h} -> {size}");
        }
    }

    /// An empty file is said as `check --decode` says it (it was "truncated"), a corrupt JPEG
    /// scan is a decode error naming the file; both carry the fix.
    #[test]
    fn empty_and_corrupt_images_are_named_with_the_fix() {
        let path = Path::new("/d/c/empty.jpg");
        let said = decode(b"", path, 3).unwrap_err().to_string();
        assert!(said.starts_with("image `/d/c/empty.jpg` is an empty file (0 bytes); remove or replace"), "{said}");
        let corrupt =
            std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/jpeg/corrupt_scan.jpg"))
                .unwrap();
        let error = decode(&corrupt, Path::new("/d/c/bad.jpg"), 3).unwrap_err();
        assert!(matches!(error, DataError::Decode { .. }), "{error:?}");
        assert!(error.to_string().contains("`/d/c/bad.jpg`"), "{error}");
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
            let coefficients = Coefficients::new(input, output, Filter::Bicubic);
            for out in 0..output {
                let weights = coefficients.weights(out);
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

#[cfg(test)]
mod size_tests {
    use super::*;

    /// A file under an image name larger than any image (a sparse 300 MiB `.png` here) fails its
    /// class naming it, without being read into memory.
    #[test]
    fn a_file_larger_than_any_image_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("c")).unwrap();
        std::fs::File::create(dir.path().join("c/huge.png")).unwrap().set_len(300 << 20).unwrap();
        let dataset = Dataset::open(&dir.path().display().to_string()).unwrap();
        let listing = dataset.list_class("c").unwrap();
        let error = dataset.read("c", &listing.images).unwrap_err();
        assert!(matches!(error, DataError::TooLarge { bytes, .. } if bytes == 300 << 20), "{error}");
        assert!(error.to_string().contains("huge.png"), "{error}");
    }
}
