//! The one ImageFolder listing rule, for local folders and object stores alike (torchvision's
//! `ImageFolder`, with its known trap fixed):
//!
//! - **Classes** (`classes = "all"`) are the folders directly under the root, sorted; hidden ones
//!   (name starting with `.`, such as `.ipynb_checkpoints`) are skipped and reported, so they
//!   never take a label.
//! - **Images** of a class are the files anywhere below its folder (recursively, following
//!   symbolic links, as `os.walk(followlinks=True)`) whose extension is one of torchvision's
//!   [`IMG_EXTENSIONS`], case-insensitive; entries under a hidden name are skipped. Order: the
//!   class folder's own files first, then each sub-folder in sorted path order, files sorted by
//!   name within a folder (`sorted(os.walk(...))`), the same for every backend.
//! - **Names are kept as given**: a local name is used as the file system gives it (also when it is
//!   not UTF-8), an object key as the listing gives it; nothing is re-encoded.
//! - **Every skipped entry is counted** (hidden entries and files that are not images), with the
//!   first few names, so that the class's marker can record it.

use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::store::Location;

/// torchvision's `IMG_EXTENSIONS`, lower case, without the dot.
pub const IMG_EXTENSIONS: [&str; 9] = ["jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp"];

/// How many skipped names a listing keeps as examples.
pub const SKIPPED_EXAMPLES: usize = 20;

/// Symbolic links can make cycles: a walk goes no deeper than this.
const MAX_DEPTH: usize = 64;

/// Errors of a listing; each names the class (or root) and where.
#[derive(Debug, Error)]
pub enum ListError {
    /// The class folder does not exist (in a store: nothing is under the class prefix).
    #[error("class `{class}`: folder `{dir}` does not exist")]
    ClassNotFound {
        /// The class folder name.
        class: String,
        /// The folder path or URL looked at.
        dir: String,
    },
    /// The class folder holds no file with an image extension.
    #[error("class `{class}`: folder `{dir}` holds no images ({extensions}){skipped}")]
    EmptyClass {
        /// The class folder name.
        class: String,
        /// The folder path or URL.
        dir: String,
        /// The accepted extensions, for the message (`.jpg .jpeg …`).
        extensions: String,
        /// [`Skipped::describe`] of what was left out.
        skipped: String,
    },
    /// Reading a local folder failed.
    #[error("cannot list `{dir}`")]
    Io {
        /// The folder being read.
        dir: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Listing an object store failed.
    #[error("cannot list `{dir}`")]
    Store {
        /// The URL being listed.
        dir: String,
        /// The store's error.
        #[source]
        source: object_store::Error,
    },
    /// A local class folder's name is not valid UTF-8, so it cannot be a class name.
    #[error(
        "dataset folder `{root}` holds a class folder whose name is not valid UTF-8 ({shown}): rename it, or list the classes to use"
    )]
    NotUtf8 {
        /// The dataset root.
        root: String,
        /// The name with its invalid bytes escaped.
        shown: String,
    },
}

/// Where a listed image is read from: exactly what the listing gave.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ImageSource {
    /// A local file, by the path the file system listed (not necessarily UTF-8).
    Local(PathBuf),
    /// An object key, exactly as the store listed it.
    Store(object_store::path::Path),
}

/// One image of a class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    /// Path below the class folder, `/`-separated (lossy for a non-UTF-8 local name: for display
    /// and digests only).
    pub relative: String,
    /// Where the bytes are read from.
    pub source: ImageSource,
    /// Size in bytes.
    pub bytes: u64,
    /// What changes when the file is rewritten: the object's ETag, or a local file's modification
    /// time in nanoseconds.
    pub version: Option<String>,
}

impl ImageRef {
    /// The full path or key, for messages.
    pub fn display(&self) -> String {
        match &self.source {
            ImageSource::Local(path) => path.display().to_string(),
            ImageSource::Store(key) => key.to_string(),
        }
    }
}

/// What a listing left out.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// Hidden entries (files, or folders not descended into).
    pub hidden: u32,
    /// Files whose extension is not an image extension.
    pub not_images: u32,
    /// The first [`SKIPPED_EXAMPLES`] skipped names.
    pub examples: Vec<String>,
}

impl Skipped {
    fn add(&mut self, hidden: bool, name: String) {
        if hidden {
            self.hidden += 1;
        } else {
            self.not_images += 1;
        }
        if self.examples.len() < SKIPPED_EXAMPLES {
            self.examples.push(name);
        }
    }

    /// Entries skipped in all.
    pub fn total(&self) -> u32 {
        self.hidden + self.not_images
    }

    /// `"; skipped 2 hidden and 1 non-image entries (.x, a.txt)"`, or empty.
    pub fn describe(&self) -> String {
        if self.total() == 0 {
            return String::new();
        }
        format!(
            "; skipped {} hidden and {} non-image entries ({})",
            self.hidden,
            self.not_images,
            self.examples.iter().map(|e| e.escape_debug().to_string()).collect::<Vec<_>>().join(", ")
        )
    }
}

/// A class's images in the rule's order, and what was skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClassListing {
    /// The images: the class folder's own files first, then each sub-folder in sorted path
    /// order, files sorted by name within a folder.
    pub images: Vec<ImageRef>,
    /// What the listing left out.
    pub skipped: Skipped,
}

impl ClassListing {
    /// A digest of the listing (relative names, sizes and versions): what decides a class's real
    /// images, short of reading them.
    pub fn digest(&self) -> String {
        let text: String = self
            .images
            .iter()
            .map(|i| format!("{}\t{}\t{}\n", i.relative, i.bytes, i.version.as_deref().unwrap_or("")))
            .collect();
        crate::sha256_hex(text.as_bytes())
    }
}

/// Whether a name is hidden (starts with `.`).
pub fn is_hidden(name: &str) -> bool {
    name.starts_with('.')
}

/// Whether a file name has one of [`IMG_EXTENSIONS`] (case-insensitive).
pub fn is_image_name(name: &str) -> bool {
    name.rsplit_once('.')
        .is_some_and(|(stem, ext)| !stem.is_empty() && IMG_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str()))
}

/// The sort key of the rule's order: (folder below the class, file name).
fn order(relative: &str) -> (String, String) {
    match relative.rsplit_once('/') {
        Some((dir, name)) => (dir.to_owned(), name.to_owned()),
        None => (String::new(), relative.to_owned()),
    }
}

fn finish(class: &str, dir: String, mut listing: ClassListing) -> Result<ClassListing, ListError> {
    if listing.images.is_empty() {
        return Err(ListError::EmptyClass {
            class: class.into(),
            dir,
            extensions: IMG_EXTENSIONS.map(|e| format!(".{e}")).join(" "),
            skipped: listing.skipped.describe(),
        });
    }
    listing.images.sort_by_cached_key(|i| order(&i.relative));
    Ok(listing)
}

/// Lists class `class` of the local ImageFolder at `root`.
///
/// # Errors
/// [`ListError::ClassNotFound`], [`ListError::EmptyClass`], [`ListError::Io`].
pub fn list_local_class(root: &Path, class: &str) -> Result<ClassListing, ListError> {
    let dir = root.join(class);
    if !dir.is_dir() {
        return Err(ListError::ClassNotFound { class: class.into(), dir: dir.display().to_string() });
    }
    let mut listing = ClassListing::default();
    let mut stack = vec![(dir.clone(), String::new(), 0usize)];
    while let Some((folder, relative, depth)) = stack.pop() {
        let io = |source| ListError::Io { dir: folder.display().to_string(), source };
        for entry in std::fs::read_dir(&folder).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name();
            let shown = name.to_string_lossy().into_owned();
            let path = entry.path();
            let rel = if relative.is_empty() { shown.clone() } else { format!("{relative}/{shown}") };
            if is_hidden(&shown) {
                listing.skipped.add(true, rel);
                continue;
            }
            // Follows symbolic links, as torchvision does.
            let Ok(meta) = std::fs::metadata(&path) else {
                listing.skipped.add(false, rel);
                continue;
            };
            if meta.is_dir() {
                if depth < MAX_DEPTH {
                    stack.push((path, rel, depth + 1));
                }
            } else if is_image_name(&shown) {
                let version = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_nanos().to_string());
                listing.images.push(ImageRef {
                    relative: rel,
                    source: ImageSource::Local(path),
                    bytes: meta.len(),
                    version,
                });
            } else {
                listing.skipped.add(false, rel);
            }
        }
    }
    finish(class, dir.display().to_string(), listing)
}

/// Lists class `class` of the ImageFolder at `root` in an object store.
///
/// # Errors
/// [`ListError::ClassNotFound`] when nothing is under the class prefix, [`ListError::EmptyClass`],
/// [`ListError::Store`].
pub async fn list_store_class(root: &Location, class: &str) -> Result<ClassListing, ListError> {
    let prefix = root.key(class);
    let dir = format!("{}/{class}", root.url.trim_end_matches('/'));
    let objects: Vec<_> = root
        .store
        .list(Some(&prefix))
        .try_collect()
        .await
        .map_err(|source| ListError::Store { dir: dir.clone(), source })?;
    if objects.is_empty() {
        return Err(ListError::ClassNotFound { class: class.into(), dir });
    }
    let mut listing = ClassListing::default();
    for object in objects {
        let parts: Vec<String> = object
            .location
            .prefix_match(&prefix)
            .map(|parts| parts.map(|p| p.as_ref().to_owned()).collect())
            .unwrap_or_default();
        let Some(name) = parts.last() else { continue };
        let relative = parts.join("/");
        // A zero-byte `folder/` marker object is no entry at all.
        if object.location.as_ref().ends_with('/') {
            continue;
        }
        if parts.iter().any(|p| is_hidden(p)) {
            listing.skipped.add(true, relative);
        } else if is_image_name(name) {
            listing.images.push(ImageRef {
                relative,
                bytes: object.size,
                version: object.e_tag.clone(),
                source: ImageSource::Store(object.location),
            });
        } else {
            listing.skipped.add(false, relative);
        }
    }
    finish(class, dir, listing)
}

/// The class folders of a local ImageFolder root, sorted, and the hidden folders skipped.
///
/// # Errors
/// [`ListError::Io`]; [`ListError::NotUtf8`] for a folder name that cannot be a class name.
pub fn list_local_classes(root: &Path) -> Result<(Vec<String>, Vec<String>), ListError> {
    let io = |source| ListError::Io { dir: root.display().to_string(), source };
    let (mut classes, mut hidden) = (Vec::new(), Vec::new());
    for entry in std::fs::read_dir(root).map_err(io)? {
        let entry = entry.map_err(io)?;
        if !std::fs::metadata(entry.path()).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            return Err(ListError::NotUtf8 {
                root: root.display().to_string(),
                shown: format!("{:?}", entry.file_name()),
            });
        };
        if is_hidden(name) { hidden.push(name.to_owned()) } else { classes.push(name.to_owned()) }
    }
    classes.sort();
    hidden.sort();
    Ok((classes, hidden))
}

/// The class folders of an ImageFolder root in an object store, sorted, and the hidden folders
/// skipped.
///
/// # Errors
/// [`ListError::Store`].
pub async fn list_store_classes(root: &Location) -> Result<(Vec<String>, Vec<String>), ListError> {
    let listing = root
        .store
        .list_with_delimiter(Some(&root.prefix))
        .await
        .map_err(|source| ListError::Store { dir: root.url.clone(), source })?;
    let (mut classes, mut hidden) = (Vec::new(), Vec::new());
    for prefix in listing.common_prefixes {
        let Some(name) = prefix.filename() else { continue };
        if is_hidden(name) { hidden.push(name.to_owned()) } else { classes.push(name.to_owned()) }
    }
    classes.sort();
    hidden.sort();
    Ok((classes, hidden))
}

/// An ImageFolder root: a local folder (a path or `file://` URL) or an object-store location.
#[derive(Clone, Debug)]
pub enum Root {
    /// A local folder.
    Local(PathBuf),
    /// A prefix in an object store.
    Store(Location),
}

impl Root {
    /// Opens a root by URL or path. A `file://` URL is decoded once, like every other location.
    ///
    /// # Errors
    /// [`crate::store::StoreError`] for a URL that cannot be opened.
    pub fn open(url: &str) -> Result<Root, crate::store::StoreError> {
        if url.starts_with("file://") {
            let path = url::Url::parse(url).ok().and_then(|u| u.to_file_path().ok()).ok_or_else(|| {
                crate::store::StoreError::BadUrl { url: url.to_owned(), problem: "not an absolute file path".into() }
            })?;
            return Ok(Root::Local(path));
        }
        if crate::store::is_url(url) {
            return Ok(Root::Store(crate::store::open(url)?));
        }
        Ok(Root::Local(PathBuf::from(url)))
    }

    /// The root as a path or URL, for messages.
    pub fn url(&self) -> String {
        match self {
            Root::Local(path) => path.display().to_string(),
            Root::Store(location) => location.url.clone(),
        }
    }

    /// Lists one class by the rule (the local walk runs on a blocking thread).
    ///
    /// # Errors
    /// See [`list_local_class`] and [`list_store_class`].
    pub async fn list_class(&self, class: &str) -> Result<ClassListing, ListError> {
        match self {
            Root::Local(root) => {
                let (root, class) = (root.clone(), class.to_owned());
                tokio::task::spawn_blocking(move || list_local_class(&root, &class)).await.expect("listing task")
            }
            Root::Store(location) => list_store_class(location, class).await,
        }
    }

    /// The class folders (sorted) and the hidden folders skipped.
    ///
    /// # Errors
    /// See [`list_local_classes`] and [`list_store_classes`].
    pub async fn list_classes(&self) -> Result<(Vec<String>, Vec<String>), ListError> {
        match self {
            Root::Local(root) => {
                let root = root.clone();
                tokio::task::spawn_blocking(move || list_local_classes(&root)).await.expect("listing task")
            }
            Root::Store(location) => list_store_classes(location).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::ObjectStoreExt;

    /// A tree with every kind of entry the rule decides on.
    fn tree(root: &Path) {
        for (path, bytes) in [
            ("a/1.png", 3),
            ("a/x.BMP", 4),
            ("a/sub/2.png", 5),
            ("a/sub/deeper/3.webp", 6),
            ("a/sub/.hidden.png", 1),
            ("a/.DS_Store", 1),
            ("a/notes.txt", 1),
            ("a/100%.png", 7),
            ("a/café.png", 8),
            ("b/only.jpg", 2),
            (".ipynb_checkpoints/a-checkpoint.png", 1),
        ] {
            let path = root.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, vec![0u8; bytes]).unwrap();
        }
        std::fs::write(root.join("README.txt"), b"not a class").unwrap();
    }

    #[test]
    fn the_rule_on_a_local_folder() {
        let dir = tempfile::tempdir().unwrap();
        tree(dir.path());
        let (classes, hidden) = list_local_classes(dir.path()).unwrap();
        assert_eq!((classes, hidden), (vec!["a".to_owned(), "b".to_owned()], vec![".ipynb_checkpoints".to_owned()]));
        let listing = list_local_class(dir.path(), "a").unwrap();
        let names: Vec<_> = listing.images.iter().map(|i| i.relative.as_str()).collect();
        assert_eq!(names, ["1.png", "100%.png", "café.png", "x.BMP", "sub/2.png", "sub/deeper/3.webp"]);
        assert_eq!((listing.skipped.hidden, listing.skipped.not_images), (2, 1));
        // Names reach reads unchanged.
        for image in &listing.images {
            let ImageSource::Local(path) = &image.source else { panic!() };
            assert_eq!(std::fs::read(path).unwrap().len() as u64, image.bytes, "{}", image.relative);
        }
        let error = list_local_class(dir.path(), "missing").unwrap_err().to_string();
        assert!(error.contains("`missing`") && error.contains("does not exist"), "{error}");
        std::fs::create_dir(dir.path().join("empty")).unwrap();
        std::fs::write(dir.path().join("empty/readme.md"), b"x").unwrap();
        let error = list_local_class(dir.path(), "empty").unwrap_err().to_string();
        assert!(error.contains("holds no images") && error.contains("readme.md"), "{error}");
    }

    /// Names that are not UTF-8: a file is listed and read under its exact bytes; a class folder
    /// is an error naming it (it can be no class name), never silently dropped.
    #[test]
    fn names_that_are_not_utf8() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a")).unwrap();
        let odd = dir.path().join("a").join(std::ffi::OsStr::from_bytes(b"caf\xe9.png"));
        std::fs::write(&odd, b"12345").unwrap();
        let listing = list_local_class(dir.path(), "a").unwrap();
        assert_eq!(listing.images.len(), 1);
        let ImageSource::Local(path) = &listing.images[0].source else { panic!() };
        assert_eq!(std::fs::read(path).unwrap(), b"12345");
        std::fs::create_dir(dir.path().join(std::ffi::OsStr::from_bytes(b"n\xff"))).unwrap();
        let error = list_local_classes(dir.path()).unwrap_err().to_string();
        assert!(error.contains("not valid UTF-8") && error.contains("\\xFF"), "{error}");
    }

    /// The same tree in an object store (here in memory) lists the same: same classes, same
    /// images in the same order, same skipped counts.
    #[tokio::test]
    async fn the_rule_is_the_same_in_an_object_store() {
        let dir = tempfile::tempdir().unwrap();
        tree(dir.path());
        let store = crate::store::open("memory://imagefolder-rule/my data/train").unwrap();
        let mut stack = vec![dir.path().to_owned()];
        while let Some(folder) = stack.pop() {
            for entry in std::fs::read_dir(&folder).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    let relative = path.strip_prefix(dir.path()).unwrap().to_str().unwrap().to_owned();
                    store.store.put(&store.key(&relative), std::fs::read(&path).unwrap().into()).await.unwrap();
                }
            }
        }
        let (classes, hidden) = list_store_classes(&store).await.unwrap();
        assert_eq!((classes, hidden), (vec!["a".to_owned(), "b".to_owned()], vec![".ipynb_checkpoints".to_owned()]));
        let local = list_local_class(dir.path(), "a").unwrap();
        let remote = list_store_class(&store, "a").await.unwrap();
        let strip = |l: &ClassListing| l.images.iter().map(|i| (i.relative.clone(), i.bytes)).collect::<Vec<_>>();
        assert_eq!(strip(&remote), strip(&local));
        assert_eq!((remote.skipped.hidden, remote.skipped.not_images), (2, 1));
        // Keys come back exactly as listed: reading them finds the objects.
        for image in &remote.images {
            let ImageSource::Store(key) = &image.source else { panic!() };
            assert!(key.as_ref().starts_with("my data/train/a/"), "{key}");
            let bytes = store.store.get(key).await.unwrap().bytes().await.unwrap();
            assert_eq!(bytes.len() as u64, image.bytes, "{}", image.relative);
        }
    }

    #[test]
    fn extensions_follow_torchvision_case_insensitively() {
        for name in ["a.jpg", "b.JPEG", "c.png", "d.ppm", "e.bmp", "f.pgm", "g.tif", "h.TIFF", "i.webp"] {
            assert!(is_image_name(name), "{name}");
        }
        for name in ["a.txt", "b.json", "jpg", "c.png.bak", ".png", "d.gif"] {
            assert!(!is_image_name(name), "{name}");
        }
    }
}
