//! `coordinator check --decode`: every real image of a job's classes read and decoded, in
//! parallel, with the test the workers apply ([`mgd3_common::imagecheck::decode_image`]), so that
//! every unreadable file is listed at once before the job is submitted instead of failing its
//! class hours into the run.

use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use mgd3_common::imagecheck::MAX_IMAGE_BYTES;
use mgd3_common::imagefolder::{ImageRef, ImageSource, ListError, Root};
use mgd3_common::job::ClassRef;

/// One image that is not usable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unreadable {
    /// Its class folder.
    pub class: String,
    /// Its path or key.
    pub image: String,
    /// Why, in one phrase with its causes (`truncated: …`, `not an image …: …`).
    pub problem: String,
}

/// What [`decode_all`] found.
#[derive(Debug, Default)]
pub struct DecodeReport {
    /// Images read and decoded.
    pub images: usize,
    /// Bytes read.
    pub bytes: u64,
    /// Every image that is not usable, sorted by class and path.
    pub unreadable: Vec<Unreadable>,
}

/// Lists `classes` of `root` (as the workers do) and reads and decodes every image, `parallel`
/// at a time (reads concurrent, decodes on blocking threads), with a progress bar on stderr
/// unless `quiet`.
///
/// # Errors
/// A class that cannot be listed (its listing error, which names it).
pub async fn decode_all(
    root: &Root,
    classes: &[ClassRef],
    parallel: usize,
    quiet: bool,
) -> Result<DecodeReport, ListError> {
    let mut images: Vec<(String, ImageRef)> = Vec::new();
    for class in classes {
        let listing = root.list_class(&class.wnid).await?;
        images.extend(listing.images.into_iter().map(|image| (class.wnid.clone(), image)));
    }
    let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new(images.len() as u64) };
    bar.set_style(
        ProgressStyle::with_template("decoding {pos}/{len} images [{bar:30}] {per_sec}, {eta} left")
            .expect("template")
            .progress_chars("=> "),
    );
    let mut report = DecodeReport { images: images.len(), ..Default::default() };
    let results: Vec<(u64, Option<Unreadable>)> = futures::stream::iter(images)
        .map(|(class, image)| {
            let bar = bar.clone();
            async move {
                let name = image.display();
                let unreadable = |problem: String| Unreadable { class: class.clone(), image: name.clone(), problem };
                // Not read: no worker would (submit names it too).
                if image.bytes > MAX_IMAGE_BYTES {
                    bar.inc(1);
                    let problem = format!(
                        "{} bytes, more than the {MAX_IMAGE_BYTES} bytes mgd3 reads for one image; remove it from the \
                         class or convert it to a compressed image format",
                        image.bytes
                    );
                    return (0, Some(unreadable(problem)));
                }
                let bytes = match read(root, &image).await {
                    Ok(bytes) => bytes,
                    Err(problem) => {
                        bar.inc(1);
                        return (0, Some(unreadable(problem)));
                    }
                };
                let size = bytes.len() as u64;
                let decoded =
                    tokio::task::spawn_blocking(move || mgd3_common::imagecheck::decode_image(&bytes).map(drop)).await;
                bar.inc(1);
                let problem = match decoded {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(mgd3_common::error_chain(&e)),
                    Err(panic) => Some(format!("the decoder crashed: {panic}")),
                };
                (size, problem.map(unreadable))
            }
        })
        .buffer_unordered(parallel.max(1))
        .collect()
        .await;
    bar.finish_and_clear();
    for (bytes, problem) in results {
        report.bytes += bytes;
        report.unreadable.extend(problem);
    }
    report.unreadable.sort_by(|a, b| (&a.class, &a.image).cmp(&(&b.class, &b.image)));
    Ok(report)
}

/// The bytes of one listed image, or why they cannot be read.
pub(crate) async fn read(root: &Root, image: &ImageRef) -> Result<bytes::Bytes, String> {
    match (&image.source, root) {
        (ImageSource::Local(path), _) => {
            let path = path.clone();
            tokio::task::spawn_blocking(move || std::fs::read(&path))
                .await
                .map_err(|e| e.to_string())?
                .map(bytes::Bytes::from)
                .map_err(|e| format!("cannot be read: {e}"))
        }
        (ImageSource::Store(key), Root::Store(location)) => {
            match mgd3_common::store::get_optional(location.store.as_ref(), key).await {
                Ok(Some(bytes)) => Ok(bytes),
                Ok(None) => Err("vanished after it was listed".into()),
                Err(e) => Err(format!("cannot be read: {}", mgd3_common::error_chain(&e))),
            }
        }
        (ImageSource::Store(_), Root::Local(_)) => Err("listed as an object of a local dataset".into()),
    }
}
