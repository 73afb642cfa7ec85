//! `coordinator export JOB --npz FILE`: the distilled images as the `.npz` that DiT's
//! `sample_ddp.py` writes for the ADM evaluation suite (guided-diffusion's `evaluator.py`, FID /
//! sFID / IS / precision / recall): one array `arr_0`, uint8 `[N, H, W, 3]` RGB, in the job's
//! class order and sample order within a class (so `labels` of the manifest's classes, each
//! repeated IPC times, are the images' classes). Greyscale samples are written as three equal
//! channels, as the evaluator expects RGB.
//!
//! The archive is written as it is read — one image at a time into a stored (uncompressed, as
//! `np.savez` does) ZIP64 entry — so ImageNet-1K at IPC 50 (9.8 GB of pixels at 256 px) needs no
//! more memory than one image.

use std::io::Write;

use mgd3_common::store::Location;
use thiserror::Error;
use zip::write::SimpleFileOptions;

use crate::report::{JobRecords, ReportError, read_records};

/// Why an export failed.
#[derive(Debug, Error)]
pub enum ExportError {
    /// The job's records could not be read.
    #[error(transparent)]
    Records(#[from] ReportError),
    /// The job is not finished: an export of part of it would be mistaken for the whole.
    #[error(
        "job `{job}` has no manifest.json in `{url}` yet ({committed} class(es) committed): export once it has succeeded, or pass --partial"
    )]
    NotFinished {
        /// The job id.
        job: String,
        /// Its output folder.
        url: String,
        /// Classes committed so far.
        committed: usize,
    },
    /// An image could not be read or decoded.
    #[error("class `{wnid}`: cannot read `{key}`")]
    Image {
        /// The class.
        wnid: String,
        /// The image's key in the job folder.
        key: String,
        /// What went wrong.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The images do not all have one size (the evaluator needs one array).
    #[error(
        "class `{wnid}`: `{key}` is {got:?} pixels, the images before it {want:?}: an .npz holds images of one size"
    )]
    MixedSizes {
        /// The class.
        wnid: String,
        /// The image.
        key: String,
        /// Its (width, height).
        got: (u32, u32),
        /// The first image's.
        want: (u32, u32),
    },
    /// The archive would be written into the job's own folder, over or beside its records,
    /// markers or distilled images.
    #[error(
        "`{path}` is inside the job's folder `{folder}`: it would overwrite or join the job's records, commit \
         markers or distilled images (a file in dataset/ becomes part of the set); write the .npz elsewhere"
    )]
    InsideJob {
        /// The .npz path.
        path: String,
        /// The job's folder.
        folder: String,
    },
    /// What stands at the archive's path is not a regular file, which the archive would replace.
    #[error("`{path}` is {what}, not a file: name the .npz file to write (an existing regular file is replaced)")]
    NotAFile {
        /// The .npz path.
        path: String,
        /// What is there.
        what: &'static str,
    },
    /// An image does not match the sha256 its commit marker records (changed since its commit).
    #[error(
        "class `{wnid}`: `{key}` is not the image its commit marker records (changed since): `coordinator verify` \
         names every such file and `coordinator resume` puts the job's own bytes back"
    )]
    Changed {
        /// The class.
        wnid: String,
        /// The image's key in the job folder.
        key: String,
    },
    /// The archive could not be written.
    #[error("cannot write `{path}`")]
    Write {
        /// The .npz path.
        path: String,
        /// The I/O or ZIP error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The archive's file, which discards everything once `aborted` is set (an export that failed:
/// its partial file is removed, and zip's drop must neither fail on it nor say so). Discarded
/// writes and seeks keep a position of their own, as zip's bookkeeping expects.
struct Abortable {
    inner: std::io::BufWriter<std::fs::File>,
    aborted: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// (position, end) once aborted.
    void: Option<(u64, u64)>,
}

impl Abortable {
    /// The position and end of the discarding writer, when aborted.
    fn void(&mut self) -> Option<&mut (u64, u64)> {
        if !self.aborted.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        if self.void.is_none() {
            let at =
                std::io::Seek::stream_position(self.inner.get_mut()).unwrap_or(0) + self.inner.buffer().len() as u64;
            self.void = Some((at, at));
        }
        self.void.as_mut()
    }
}

impl std::io::Write for Abortable {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.void() {
            Some((at, end)) => {
                *at += buf.len() as u64;
                *end = (*end).max(*at);
                Ok(buf.len())
            }
            None => self.inner.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self.void() {
            Some(_) => Ok(()),
            None => self.inner.flush(),
        }
    }
}

impl std::io::Seek for Abortable {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        match self.void() {
            Some((at, end)) => {
                let target = match to {
                    std::io::SeekFrom::Start(n) => i128::from(n),
                    std::io::SeekFrom::Current(d) => i128::from(*at) + i128::from(d),
                    std::io::SeekFrom::End(d) => i128::from(*end) + i128::from(d),
                };
                *at = u64::try_from(target.max(0)).unwrap_or(0);
                Ok(*at)
            }
            None => self.inner.seek(to),
        }
    }
}

/// What an export wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exported {
    /// Images written.
    pub images: usize,
    /// Classes they came from.
    pub classes: usize,
    /// Image (width, height).
    pub size: (u32, u32),
    /// The classes in the order their images are in the array (with each one's image count):
    /// the array holds no labels.
    pub order: Vec<(String, usize)>,
    /// The job's classes that are not in the array (no commit yet, or failed), in job order;
    /// empty for a finished job or when the job's record is not there to say.
    pub missing: Vec<String>,
}

/// The `.npy` header of a C-order uint8 array of `shape`, padded so the data starts on a
/// 64-byte boundary (format version 1.0).
fn npy_header(shape: [usize; 4]) -> Vec<u8> {
    let dict = format!(
        "{{'descr': '|u1', 'fortran_order': False, 'shape': ({}, {}, {}, {}), }}",
        shape[0], shape[1], shape[2], shape[3]
    );
    let unpadded = 10 + dict.len() + 1;
    let padding = unpadded.div_ceil(64) * 64 - unpadded;
    let mut header = b"\x93NUMPY\x01\x00".to_vec();
    header.extend_from_slice(&((dict.len() + padding + 1) as u16).to_le_bytes());
    header.extend_from_slice(dict.as_bytes());
    header.extend(std::iter::repeat_n(b' ', padding));
    header.push(b'\n');
    header
}

/// Writes every committed image of the job in `dir` into `path` as `arr_0`. Unless `partial`, the
/// job must have its manifest (it succeeded).
///
/// # Errors
/// [`ExportError::NotFinished`] for an unfinished job without `partial`; the others for images
/// that cannot be read or differ in size, and for the file.
pub async fn export_npz(
    dir: &Location,
    job_id: &str,
    path: &std::path::Path,
    partial: bool,
) -> Result<Exported, ExportError> {
    let records: JobRecords = read_records(dir, job_id).await?;
    // A failed job's records may hold no commit at all (its report shows why): nothing to export.
    if records.markers.is_empty() {
        return Err(ReportError::NothingCommitted { url: dir.url.clone(), job: job_id.into() }.into());
    }
    if records.manifest.is_none() && !partial {
        return Err(ExportError::NotFinished {
            job: job_id.into(),
            url: dir.url.clone(),
            committed: records.markers.len(),
        });
    }
    if let Some(root) = &dir.local_root {
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        if let (Ok(folder), Ok(parent)) = (root.canonicalize(), parent.canonicalize())
            && parent.starts_with(&folder)
        {
            return Err(ExportError::InsideJob {
                path: path.display().to_string(),
                folder: folder.display().to_string(),
            });
        }
    }
    // Any other job's folder is as much its own.
    if let Some(folder) = crate::submit::job_folder_around(path) {
        return Err(ExportError::InsideJob { path: path.display().to_string(), folder: folder.display().to_string() });
    }
    // The archive replaces a regular file (written beside it, then renamed over it); anything
    // else standing there (a device such as /dev/null, a pipe, a link, a folder) is refused
    // rather than replaced.
    if path.as_os_str() == "-" {
        return Err(ExportError::NotAFile { path: "-".into(), what: "standard output (export writes a file)" });
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        let kind = meta.file_type();
        let what = if kind.is_symlink() {
            Some("a symbolic link")
        } else if kind.is_dir() {
            Some("a folder")
        } else if !kind.is_file() {
            Some("a device, pipe or socket")
        } else {
            None
        };
        if let Some(what) = what {
            return Err(ExportError::NotAFile { path: path.display().to_string(), what });
        }
    }
    let partial_path = path.with_extension("npz.partial");
    let written = write_npz(dir, &records, path, &partial_path).await;
    if written.is_err() {
        // A failed export leaves nothing behind to be mistaken for one.
        let _ = std::fs::remove_file(&partial_path);
    }
    written
}

/// [`export_npz`]'s writing: into `partial_path`, renamed to `path` once complete.
async fn write_npz(
    dir: &Location,
    records: &JobRecords,
    path: &std::path::Path,
    partial_path: &std::path::Path,
) -> Result<Exported, ExportError> {
    let total: usize = records.markers.iter().map(|m| m.images.len()).sum();
    let shown = path.display().to_string();
    let write_err =
        |source: Box<dyn std::error::Error + Send + Sync>| ExportError::Write { path: shown.clone(), source };
    let file = std::fs::File::create(partial_path).map_err(|e| write_err(e.into()))?;
    let aborted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut zip =
        zip::ZipWriter::new(Abortable { inner: std::io::BufWriter::new(file), aborted: aborted.clone(), void: None });
    // Filled in a block of its own, so that on an error the archive is dropped into a writer
    // that discards: zip's drop finishes the archive and prints its own line when that fails (a
    // full disk), before the real error.
    let filled = async {
        let mut size = None;
        for marker in &records.markers {
            for image in &marker.images {
                let key = format!("dataset/{}/{}", marker.wnid, image.name);
                let bad = |source: Box<dyn std::error::Error + Send + Sync>| ExportError::Image {
                    wnid: marker.wnid.clone(),
                    key: key.clone(),
                    source,
                };
                let bytes = mgd3_common::store::get_bytes(dir.store.as_ref(), &dir.key(&key))
                    .await
                    .map_err(|e| bad(e.into()))?;
                if mgd3_common::sha256_hex(&bytes) != image.sha256 {
                    return Err(ExportError::Changed { wnid: marker.wnid.clone(), key });
                }
                let rgb = image::load_from_memory(&bytes).map_err(|e| bad(e.into()))?.to_rgb8();
                let dims = rgb.dimensions();
                match size {
                    None => {
                        size = Some(dims);
                        let options = SimpleFileOptions::default()
                            .compression_method(zip::CompressionMethod::Stored)
                            .large_file(true);
                        zip.start_file("arr_0.npy", options).map_err(|e| write_err(e.into()))?;
                        zip.write_all(&npy_header([total, dims.1 as usize, dims.0 as usize, 3]))
                            .map_err(|e| write_err(e.into()))?;
                    }
                    Some(want) if want != dims => {
                        return Err(ExportError::MixedSizes { wnid: marker.wnid.clone(), key, got: dims, want });
                    }
                    Some(_) => {}
                }
                zip.write_all(rgb.as_raw()).map_err(|e| write_err(e.into()))?;
            }
        }
        Ok::<_, ExportError>(size)
    }
    .await;
    let size = match filled {
        Ok(size) => size.unwrap_or((0, 0)),
        Err(error) => {
            // The partial file is removed: what zip finishes on its way out goes nowhere.
            aborted.store(true, std::sync::atomic::Ordering::Relaxed);
            drop(zip);
            return Err(error);
        }
    };
    let mut out = zip.finish().map_err(|e| write_err(e.into()))?;
    out.flush().map_err(|e| write_err(e.into()))?;
    drop(out);
    std::fs::rename(partial_path, path).map_err(|e| write_err(e.into()))?;
    let order = records.markers.iter().map(|m| (m.wnid.clone(), m.images.len())).collect();
    let missing = records
        .job
        .iter()
        .flat_map(|job| &job.classes)
        .filter(|class| !records.markers.iter().any(|m| m.wnid == class.wnid))
        .map(|class| class.wnid.clone())
        .collect();
    Ok(Exported { images: total, classes: records.markers.len(), size, order, missing })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_npy_header_is_numpy_format_1_aligned_to_64_bytes() {
        let header = super::npy_header([50_000, 256, 256, 3]);
        assert_eq!(header.len() % 64, 0);
        assert!(header.starts_with(b"\x93NUMPY\x01\x00"));
        let len = u16::from_le_bytes([header[8], header[9]]) as usize;
        assert_eq!(len + 10, header.len());
        let text = std::str::from_utf8(&header[10..]).unwrap();
        assert!(text.starts_with("{'descr': '|u1', 'fortran_order': False, 'shape': (50000, 256, 256, 3), }"));
        assert!(text.ends_with('\n'));
    }
}
