//! Converts Debian's `dataset-fashion-mnist` (IDX files, gzip) into an ImageFolder:
//! `<out>/{train,test}/<NN_name>/<index>.png` with stable class folders (label NN, Zalando's
//! class name) and `<out>/classes.txt` listing the folders in label order.

use std::io::Read;
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use image::GrayImage;
use thiserror::Error;

/// Fashion-MNIST's classes in label order, as folder names.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "00_tshirt_top",
    "01_trouser",
    "02_pullover",
    "03_dress",
    "04_coat",
    "05_sandal",
    "06_shirt",
    "07_sneaker",
    "08_bag",
    "09_ankle_boot",
];

/// Errors of the Fashion-MNIST import.
#[derive(Debug, Error)]
pub enum ImportError {
    /// A source file is missing or is not readable gzip.
    #[error("cannot read `{path}` (install it with `apt-get install dataset-fashion-mnist`)")]
    Read {
        /// The `.gz` file.
        path: PathBuf,
        /// The I/O (or gzip) error.
        #[source]
        source: std::io::Error,
    },
    /// A source file lacks the IDX magic, has the wrong length, or holds a label outside 0..10.
    #[error("`{path}` is not an IDX file of {what}: {problem}")]
    Format {
        /// The `.gz` file.
        path: PathBuf,
        /// `images` or `labels`.
        what: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// An output folder, PNG or `classes.txt` cannot be written.
    #[error("cannot write `{path}`")]
    Write {
        /// The file or folder being written.
        path: PathBuf,
        /// The error (I/O errors wrapped as `ImageError::IoError`).
        #[source]
        source: image::ImageError,
    },
}

fn read_gz(path: &Path) -> Result<Vec<u8>, ImportError> {
    let file = std::fs::File::open(path).map_err(|source| ImportError::Read { path: path.into(), source })?;
    let mut bytes = Vec::new();
    GzDecoder::new(file).read_to_end(&mut bytes).map_err(|source| ImportError::Read { path: path.into(), source })?;
    Ok(bytes)
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

/// (rows, cols, pixels) of an idx3 image file.
fn images(path: &Path) -> Result<(usize, usize, Vec<u8>), ImportError> {
    let bytes = read_gz(path)?;
    let bad = |problem: String| ImportError::Format { path: path.into(), what: "images", problem };
    if bytes.len() < 16 || be_u32(&bytes, 0) != 0x0803 {
        return Err(bad("missing the 0x00000803 magic".into()));
    }
    let (n, rows, cols) = (be_u32(&bytes, 4) as usize, be_u32(&bytes, 8) as usize, be_u32(&bytes, 12) as usize);
    if bytes.len() != 16 + n * rows * cols {
        return Err(bad(format!("{} bytes for {n} images of {rows}×{cols}", bytes.len())));
    }
    Ok((rows, cols, bytes[16..].to_vec()))
}

fn labels(path: &Path) -> Result<Vec<u8>, ImportError> {
    let bytes = read_gz(path)?;
    let bad = |problem: String| ImportError::Format { path: path.into(), what: "labels", problem };
    if bytes.len() < 8 || be_u32(&bytes, 0) != 0x0801 {
        return Err(bad("missing the 0x00000801 magic".into()));
    }
    let n = be_u32(&bytes, 4) as usize;
    if bytes.len() != 8 + n || bytes[8..].iter().any(|l| *l as usize >= FASHION_MNIST_CLASSES.len()) {
        return Err(bad(format!("{} bytes for {n} labels in 0..10", bytes.len())));
    }
    Ok(bytes[8..].to_vec())
}

/// Writes the ImageFolder; `per_class` caps the images written per class and split (first ones).
/// Returns the number of images written.
///
/// The sources are `{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz` in `src` (Debian installs
/// them in `/usr/share/datasets/fashion-mnist`); each image becomes an 8-bit grayscale PNG named
/// by its index in the split (`00042.png`).
///
/// # Errors
/// [`ImportError::Read`] or [`ImportError::Format`] for a missing or malformed source file,
/// [`ImportError::Write`] when an output cannot be written.
pub fn import_fashion_mnist(src: &Path, out: &Path, per_class: Option<usize>) -> Result<usize, ImportError> {
    let mut written = 0;
    for (split, prefix) in [("train", "train"), ("test", "t10k")] {
        let (rows, cols, pixels) = images(&src.join(format!("{prefix}-images-idx3-ubyte.gz")))?;
        let labels = labels(&src.join(format!("{prefix}-labels-idx1-ubyte.gz")))?;
        let mut counts = [0usize; 10];
        for (index, label) in labels.iter().enumerate() {
            let class = *label as usize;
            if per_class.is_some_and(|cap| counts[class] >= cap) {
                continue;
            }
            counts[class] += 1;
            let start = index * rows * cols;
            let image = GrayImage::from_raw(cols as u32, rows as u32, pixels[start..start + rows * cols].to_vec())
                .expect("size");
            let path = out.join(split).join(FASHION_MNIST_CLASSES[class]).join(format!("{index:05}.png"));
            std::fs::create_dir_all(path.parent().expect("parent")).map_err(|source| ImportError::Write {
                path: path.clone(),
                source: image::ImageError::IoError(source),
            })?;
            image.save(&path).map_err(|source| ImportError::Write { path: path.clone(), source })?;
            written += 1;
        }
    }
    let list = out.join("classes.txt");
    std::fs::write(&list, FASHION_MNIST_CLASSES.join("\n") + "\n")
        .map_err(|source| ImportError::Write { path: list, source: image::ImageError::IoError(source) })?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compression, write::GzEncoder};
    use std::io::Write;

    fn gz(path: &Path, bytes: &[u8]) {
        let mut encoder = GzEncoder::new(std::fs::File::create(path).unwrap(), Compression::fast());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap();
    }

    fn idx(dir: &Path, prefix: &str, labels: &[u8]) {
        let mut images = vec![0, 0, 8, 3];
        for v in [labels.len() as u32, 2, 3] {
            images.extend(v.to_be_bytes());
        }
        for (i, _) in labels.iter().enumerate() {
            images.extend((0..6).map(|p| (i * 10 + p) as u8));
        }
        gz(&dir.join(format!("{prefix}-images-idx3-ubyte.gz")), &images);
        let mut bytes = vec![0, 0, 8, 1];
        bytes.extend((labels.len() as u32).to_be_bytes());
        bytes.extend(labels);
        gz(&dir.join(format!("{prefix}-labels-idx1-ubyte.gz")), &bytes);
    }

    #[test]
    fn writes_an_image_folder_with_stable_class_folders() {
        let src = tempfile::tempdir().unwrap();
        idx(src.path(), "train", &[9, 0, 9, 9]);
        idx(src.path(), "t10k", &[1]);
        let out = tempfile::tempdir().unwrap();
        assert_eq!(import_fashion_mnist(src.path(), out.path(), Some(2)).unwrap(), 4);
        let boot = out.path().join("train/09_ankle_boot");
        assert!(boot.join("00000.png").exists() && boot.join("00002.png").exists() && !boot.join("00003.png").exists());
        let img = image::open(boot.join("00002.png")).unwrap().to_luma8();
        assert_eq!((img.width(), img.height(), img.get_pixel(1, 0).0[0]), (3, 2, 21));
        assert!(out.path().join("test/01_trouser/00000.png").exists());
        let classes = std::fs::read_to_string(out.path().join("classes.txt")).unwrap();
        assert_eq!(classes.lines().count(), 10);
    }

    #[test]
    fn missing_files_say_how_to_install_them() {
        let err = import_fashion_mnist(Path::new("/nonexistent"), Path::new("/tmp/x"), None).unwrap_err();
        assert!(err.to_string().contains("dataset-fashion-mnist"), "{err}");
    }
}
