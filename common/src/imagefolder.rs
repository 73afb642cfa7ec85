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
//! - **The walk cannot loop or leave the class** (torchvision's walk can do both): a folder is
//!   entered at most once per class (by device and inode), so a link cycle such as `again -> .`
//!   is skipped; a link to a folder outside the class folder (`parent -> ..`, `other ->
//!   ../n02`) is not followed, so a class never takes another class's images; a file reached
//!   twice (a second link or hard link to it) counts once, under the name that comes first in the
//!   order above. Links to *files* anywhere are followed: a class made of links into another tree
//!   (a subset built with `ln -s`) is ordinary. Every skipped link is recorded by name.
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

/// A link in a dataset root whose target cannot be read ([`ListError::UnreachableClassLinks`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnreachableLink {
    /// The link's name, hidden characters escaped.
    pub name: String,
    /// Where it points, as written.
    pub target: String,
    /// Why its target cannot be read (`No such file or directory (os error 2)`).
    pub problem: String,
}

/// What stands where a class folder was looked for, or next to it, when the folder is missing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NearMiss {
    /// A file, not a folder, has the class's name.
    File,
    /// A folder whose name differs from the class's only in Unicode normalization (NFC against
    /// NFD, as macOS writes names; the two look the same) or in letter case.
    Folder {
        /// That folder's name.
        name: String,
        /// The names differ in letter case.
        case: bool,
        /// The names differ in Unicode normalization.
        normalization: bool,
    },
}

impl NearMiss {
    /// The end of a missing folder's message.
    fn advice(&self) -> String {
        match self {
            NearMiss::File => ": it is a file, not a folder; a class is a folder of images".into(),
            NearMiss::Folder { name, case, normalization } => {
                let how = match (case, normalization) {
                    (false, _) => {
                        "has the same name in another Unicode normalization (one NFC, the other NFD, as macOS \
                         writes names: they look the same)"
                    }
                    (true, false) => "differs from it only in letter case",
                    (true, true) => {
                        "differs from it in letter case and in Unicode normalization (one NFC, the other NFD, as \
                         macOS writes names)"
                    }
                };
                let spelt = if *normalization {
                    let spelt: String = name
                        .chars()
                        .map(|c| if c.is_ascii() { c.to_string() } else { c.escape_unicode().to_string() })
                        .collect();
                    format!(" (`{spelt}` with its characters spelt out)")
                } else {
                    String::new()
                };
                format!(
                    ", but folder `{}`{spelt} {how}: write the class exactly as that folder's name, or rename the folder",
                    name.escape_debug()
                )
            }
        }
    }

    /// The entry among `names` (a dataset root's entries) closest to `class`: the same name in
    /// another Unicode normalization, else in another letter case.
    pub fn among<'a>(class: &str, names: impl IntoIterator<Item = &'a str>) -> Option<NearMiss> {
        let nfc = icu_normalizer::ComposingNormalizerBorrowed::new_nfc();
        let class_nfc = nfc.normalize(class);
        let mut cased = None;
        for name in names {
            if name == class {
                continue;
            }
            let name_nfc = nfc.normalize(name);
            if name_nfc == class_nfc {
                return Some(NearMiss::Folder { name: name.into(), case: false, normalization: true });
            }
            if cased.is_none() && name_nfc.to_lowercase() == class_nfc.to_lowercase() {
                let normalization = name.to_lowercase() != class.to_lowercase();
                cased = Some(NearMiss::Folder { name: name.into(), case: true, normalization });
            }
        }
        cased
    }
}

/// Errors of a listing; each names the class (or root) and where.
#[derive(Debug, Error)]
pub enum ListError {
    /// The class folder does not exist (in a store: nothing is under the class prefix).
    #[error("class `{class}`: folder `{dir}` does not exist{}", near.as_ref().map(NearMiss::advice).unwrap_or_default())]
    ClassNotFound {
        /// The class folder name.
        class: String,
        /// The folder path or URL looked at.
        dir: String,
        /// What is there instead, when something is close.
        near: Option<NearMiss>,
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
    /// Entries of the dataset root that are links to folders that cannot be reached (a dataset
    /// spread over mounts, one not mounted): skipped, each would drop a class and shift the
    /// position of every class after it. Hidden ones are skipped as any hidden entry is.
    #[error(
        "the dataset root `{root}` holds {} link(s) to folders that cannot be reached: {}; mount them, or remove the \
         links (a class left out shifts every later class's label)",
        links.len(),
        links.iter().map(|l| format!("`{}` → `{}` ({})", l.name, l.target, l.problem)).collect::<Vec<_>>().join(", ")
    )]
    UnreachableClassLinks {
        /// The dataset root.
        root: String,
        /// Each such link.
        links: Vec<UnreachableLink>,
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
    /// A class folder that is the dataset's root folder or one above it (a link such as
    /// `z -> .` or `z -> ..`): its images would be every class's.
    #[error("class `{class}`: folder `{dir}` is the dataset's own folder or one above it (a link to it?): remove it")]
    ClassContainsDataset {
        /// The class folder name.
        class: String,
        /// The folder path.
        dir: String,
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
    /// and change times in nanoseconds (`<mtime>.<ctime>`).
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
    /// Links not followed and files reached a second time (see [`LinkSkip`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub links: u32,
    /// The first [`SKIPPED_EXAMPLES`] of them, by name and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub link_examples: Vec<SkippedLink>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// An entry of a local class folder that the walk did not take, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedLink {
    /// Path below the class folder, `/`-separated.
    pub path: String,
    /// Why it was skipped.
    pub reason: LinkSkip,
}

/// Why the walk skipped a link (or a second name of one file).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum LinkSkip {
    /// A folder this class's walk has already entered: a link cycle (`again -> .`) or a second
    /// link to one folder.
    Cycle,
    /// A link to a folder outside the class folder (`parent -> ..`): following it would take
    /// other classes' or unrelated images.
    OutsideClass {
        /// Where the link leads, resolved.
        target: String,
    },
    /// A file already listed under another name (a second symbolic or hard link to it).
    SameFile {
        /// The name it is listed under.
        listed_as: String,
    },
    /// A link to a file inside the dataset but in another class's folder: the class would take
    /// another class's image.
    OtherClass {
        /// Where the link leads, resolved.
        target: String,
    },
    /// A link that leads nowhere (its target is missing, or links loop).
    Broken,
    /// Not a regular file once links are followed (a FIFO, a device such as `/dev/zero`, a
    /// socket): reading it would block or never end.
    NotAFile,
}

impl std::fmt::Display for SkippedLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = self.path.escape_debug();
        match &self.reason {
            LinkSkip::Cycle => write!(f, "`{path}` (a folder already listed: a link cycle or a second link)"),
            LinkSkip::OutsideClass { target } => {
                write!(f, "`{path}` (a link to `{}`, outside the class folder)", target.escape_debug())
            }
            LinkSkip::SameFile { listed_as } => {
                write!(f, "`{path}` (the same file as `{}`)", listed_as.escape_debug())
            }
            LinkSkip::OtherClass { target } => {
                write!(f, "`{path}` (a link to `{}`, another class's image)", target.escape_debug())
            }
            LinkSkip::Broken => write!(f, "`{path}` (a broken link: its target is missing, or links loop)"),
            LinkSkip::NotAFile => write!(f, "`{path}` (not a regular file: a FIFO, device or socket)"),
        }
    }
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

    fn add_link(&mut self, path: String, reason: LinkSkip) {
        self.links += 1;
        if self.link_examples.len() < SKIPPED_EXAMPLES {
            self.link_examples.push(SkippedLink { path, reason });
        }
    }

    /// Entries skipped in all.
    pub fn total(&self) -> u32 {
        self.hidden + self.not_images + self.links
    }

    /// `"; skipped 2 hidden and 1 non-image entries (.x, a.txt); skipped 1 link(s): `again`
    /// (…)"`, or empty.
    pub fn describe(&self) -> String {
        let mut text = String::new();
        if self.hidden + self.not_images > 0 {
            text = format!(
                "; skipped {} hidden and {} non-image entries ({})",
                self.hidden,
                self.not_images,
                self.examples.iter().map(|e| e.escape_debug().to_string()).collect::<Vec<_>>().join(", ")
            );
        }
        if self.links > 0 {
            text.push_str(&format!("; {}", self.describe_links()));
        }
        text
    }

    /// `"skipped 2 link(s): `again` (…), `parent` (…)"`, or empty when no link was skipped.
    pub fn describe_links(&self) -> String {
        if self.links == 0 {
            return String::new();
        }
        let more = self.links as usize - self.link_examples.len();
        format!(
            "skipped {} link(s): {}{}",
            self.links,
            self.link_examples.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
            if more > 0 { format!(" and {more} more") } else { String::new() }
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

/// What submit recorded of a class's listing, so that a worker can tell whether the class is
/// still the data the job was submitted with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListingSummary {
    /// [`ClassListing::digest`]: names, sizes and versions.
    pub digest: String,
    /// [`ClassListing::names_digest`]: names and sizes only (a copy of the dataset made without
    /// keeping modification times has the same).
    pub names_digest: String,
    /// Images listed.
    pub images: u64,
    /// Their bytes in all.
    pub bytes: u64,
    /// [`content_digest`] of the images (names, sizes and each file's sha256), recorded when the
    /// job asks for `data_fingerprint = "content"`; `None` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_digest: Option<String>,
}

impl ListingSummary {
    /// Whether `now` is the same data as `self` for a job: the content digests when both have
    /// one, else the names and sizes. Modification times and ETags never count: a dataset copied
    /// to node-local scratch (`cp -r`) or `touch`ed is the same data.
    pub fn same_data(&self, now: &ListingSummary) -> bool {
        match (&self.content_digest, &now.content_digest) {
            (Some(then), Some(now_digest)) => then == now_digest && self.names_digest == now.names_digest,
            _ => self.names_digest == now.names_digest,
        }
    }

    /// Same names and sizes, other file times or ETags: a copy, or files rewritten in
    /// place at the same size (which only `data_fingerprint = "content"` tells apart).
    pub fn versions_differ(&self, now: &ListingSummary) -> bool {
        self.names_digest == now.names_digest && self.digest != now.digest
    }

    /// How `now` differs from `self`, in a few words: counts and bytes, or what stayed.
    pub fn change_to(&self, now: &ListingSummary) -> String {
        let then = format!("{} images, {} bytes", self.images, self.bytes);
        let now_text = format!("{} images, {} bytes", now.images, now.bytes);
        if self.names_digest == now.names_digest {
            format!("same names and sizes ({then}), other contents")
        } else if self.images == now.images && self.bytes == now.bytes {
            format!("{then} then and now, but other names or sizes (files renamed, or replaced by others)")
        } else {
            format!("{then} then, {now_text} now")
        }
    }
}

/// The digest of a class's content: `relative\tbytes\tsha256(content)` per image in the
/// listing's order, hashed. `hashes` holds each image's `sha256:<hex>`, in the order of `images`.
///
/// # Panics
/// If `hashes` and `images` differ in length.
pub fn content_digest(images: &[ImageRef], hashes: &[String]) -> String {
    assert_eq!(images.len(), hashes.len(), "one hash per image");
    let text: String =
        images.iter().zip(hashes).map(|(i, hash)| format!("{}\t{}\t{hash}\n", i.relative, i.bytes)).collect();
    crate::sha256_hex(text.as_bytes())
}

impl std::fmt::Display for ListingSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} images, {} bytes (listing {})",
            self.images,
            self.bytes,
            &self.digest[..self.digest.len().min(19)]
        )
    }
}

impl ClassListing {
    /// The listing's digest, image count and bytes.
    pub fn summary(&self) -> ListingSummary {
        ListingSummary {
            digest: self.digest(),
            names_digest: self.names_digest(),
            images: self.images.len() as u64,
            bytes: self.images.iter().map(|i| i.bytes).sum(),
            content_digest: None,
        }
    }

    /// A digest of the relative names and sizes: what stays when a dataset is copied without
    /// its modification times (`cp -r` to node-local scratch).
    pub fn names_digest(&self) -> String {
        let text: String = self.images.iter().map(|i| format!("{}\t{}\n", i.relative, i.bytes)).collect();
        crate::sha256_hex(text.as_bytes())
    }

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
        let near = if dir.exists() {
            Some(NearMiss::File)
        } else {
            let entries = std::fs::read_dir(root).into_iter().flatten().flatten();
            let dirs: Vec<String> =
                entries.filter(|e| e.path().is_dir()).filter_map(|e| e.file_name().into_string().ok()).collect();
            NearMiss::among(class, dirs.iter().map(String::as_str))
        };
        return Err(ListError::ClassNotFound { class: class.into(), dir: dir.display().to_string(), near });
    }
    let io_at = |path: &Path| {
        let dir = path.display().to_string();
        move |source| ListError::Io { dir, source }
    };
    // Where the class folder and the dataset really are: a folder link that leads out of the
    // class is not followed, nor a file link into another class's folder.
    let inside = std::fs::canonicalize(&dir).map_err(io_at(&dir))?;
    let dataset = std::fs::canonicalize(root).map_err(io_at(root))?;
    if dataset.starts_with(&inside) {
        return Err(ListError::ClassContainsDataset { class: class.into(), dir: dir.display().to_string() });
    }
    // The other classes' folders as they really are (a class folder may be a link elsewhere),
    // read once and only if a file link needs them.
    let mut other_classes: Option<Vec<PathBuf>> = None;
    let mut entered = std::collections::HashSet::new();
    let mut listing = ClassListing::default();
    let mut found = Vec::new();
    // Folders are walked in sorted path order (a folder is entered when it is taken from the
    // queue, so of two names of one folder the first in that order is listed) and entries are
    // sorted by name: the same listing on every machine.
    let mut queue = std::collections::BTreeMap::new();
    queue.insert((String::new(), 0usize), (dir.clone(), 0usize));
    let mut queued = 0;
    while let Some(((relative, _), (folder, depth))) = queue.pop_first() {
        if !entered.insert(file_id(&std::fs::metadata(&folder).map_err(io_at(&folder))?)) {
            listing.skipped.add_link(relative, LinkSkip::Cycle);
            continue;
        }
        let mut entries = std::fs::read_dir(&folder)
            .map_err(io_at(&folder))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(io_at(&folder))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = entry.file_name();
            let shown = name.to_string_lossy().into_owned();
            let path = entry.path();
            let rel = if relative.is_empty() { shown.clone() } else { format!("{relative}/{shown}") };
            if is_hidden(&shown) {
                listing.skipped.add(true, rel);
                continue;
            }
            let is_link = entry.file_type().is_ok_and(|t| t.is_symlink());
            // Follows symbolic links, as torchvision does.
            let Ok(meta) = std::fs::metadata(&path) else {
                if is_link {
                    listing.skipped.add_link(rel, LinkSkip::Broken);
                } else {
                    listing.skipped.add(false, rel);
                }
                continue;
            };
            let target = || {
                std::fs::canonicalize(&path).map_err(|source| ListError::Io { dir: path.display().to_string(), source })
            };
            if meta.is_dir() {
                if is_link {
                    let target = target()?;
                    if !target.starts_with(&inside) {
                        let target = target.display().to_string();
                        listing.skipped.add_link(rel, LinkSkip::OutsideClass { target });
                        continue;
                    }
                }
                if depth < MAX_DEPTH {
                    queued += 1;
                    queue.insert((rel, queued), (path, depth + 1));
                }
            } else if is_image_name(&shown) && !meta.is_file() {
                listing.skipped.add_link(rel, LinkSkip::NotAFile);
            } else if is_image_name(&shown)
                && is_link
                && let Ok(target) = target()
                && !target.starts_with(&inside)
                && (target.starts_with(&dataset)
                    || other_classes
                        .get_or_insert_with(|| class_folders(root, &inside))
                        .iter()
                        .any(|other| target.starts_with(other)))
            {
                listing.skipped.add_link(rel, LinkSkip::OtherClass { target: target.display().to_string() });
            } else if is_image_name(&shown) {
                let version = Some(local_version(&meta));
                let image = ImageRef { relative: rel, source: ImageSource::Local(path), bytes: meta.len(), version };
                found.push((image, file_id(&meta)));
            } else {
                listing.skipped.add(false, rel);
            }
        }
    }
    // One file reached under two names counts once, under the name that comes first in the
    // rule's order.
    found.sort_by_cached_key(|(i, _)| order(&i.relative));
    let mut first_name = std::collections::HashMap::new();
    for (image, id) in found {
        match first_name.entry(id) {
            std::collections::hash_map::Entry::Occupied(seen) => {
                let listed_as: &String = seen.get();
                listing.skipped.add_link(image.relative.clone(), LinkSkip::SameFile { listed_as: listed_as.clone() });
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(image.relative.clone());
                listing.images.push(image);
            }
        }
    }
    finish(class, dir.display().to_string(), listing)
}

/// The real folders of the dataset's class folders other than `own` (links resolved). Read once
/// per dataset folder and process while the folder is unchanged (its modification time): a
/// symlink farm of 21,841 classes would otherwise resolve every class folder once per class.
fn class_folders(root: &Path, own: &Path) -> Vec<PathBuf> {
    type Key = (PathBuf, Option<std::time::SystemTime>);
    static CACHE: std::sync::Mutex<Option<(Key, std::sync::Arc<Vec<PathBuf>>)>> = std::sync::Mutex::new(None);
    let key = (root.to_path_buf(), std::fs::metadata(root).and_then(|m| m.modified()).ok());
    let cached = CACHE.lock().expect("class folders").as_ref().filter(|(k, _)| *k == key).map(|(_, f)| f.clone());
    let all = cached.unwrap_or_else(|| {
        let folders: Vec<PathBuf> = std::fs::read_dir(root)
            .map(|entries| {
                entries
                    .filter_map(|entry| std::fs::canonicalize(entry.ok()?.path()).ok())
                    .filter(|real| real.is_dir())
                    .collect()
            })
            .unwrap_or_default();
        let folders = std::sync::Arc::new(folders);
        *CACHE.lock().expect("class folders") = Some((key, folders.clone()));
        folders
    });
    all.iter().filter(|real| *real != own).cloned().collect()
}

/// A file's identity on this machine: (device, inode).
/// A local file's version: its modification and change times, `<mtime ns>.<ctime ns>`. The
/// change time is there because a file rewritten in place can be given its old modification time
/// back (`touch -r`, `cp -p` or `rsync -a` from a regenerated source onto it) and no one can set the
/// change time: whatever compares versions to skip reading a file (the latent cache) then reads it.
/// A copy of the dataset (`cp -r`, a tar unpacked to scratch) has other versions too, and is read
/// once to find it is the same.
fn local_version(meta: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    let ns = |s: i64, ns: i64| i128::from(s) * 1_000_000_000 + i128::from(ns);
    format!("{}.{}", ns(meta.mtime(), meta.mtime_nsec()), ns(meta.ctime(), meta.ctime_nsec()))
}

fn file_id(meta: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
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
        // The root's folders, for a near miss (an error path: one listing more).
        let folders = root.store.list_with_delimiter(Some(&root.key(""))).await.ok();
        let names: Vec<String> = folders
            .into_iter()
            .flat_map(|listed| listed.common_prefixes)
            .filter_map(|prefix| prefix.filename().map(str::to_owned))
            .collect();
        let near = NearMiss::among(class, names.iter().map(String::as_str));
        return Err(ListError::ClassNotFound { class: class.into(), dir, near });
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
/// [`ListError::Io`]; [`ListError::NotUtf8`] for a folder name that cannot be a class name;
/// [`ListError::UnreachableClassLinks`] naming every (not hidden) link whose target cannot be
/// read.
pub fn list_local_classes(root: &Path) -> Result<(Vec<String>, Vec<String>), ListError> {
    let io = |source| ListError::Io { dir: root.display().to_string(), source };
    let (mut classes, mut hidden, mut unreachable) = (Vec::new(), Vec::new(), Vec::new());
    for entry in std::fs::read_dir(root).map_err(io)? {
        let entry = entry.map_err(io)?;
        match std::fs::metadata(entry.path()) {
            Ok(metadata) if metadata.is_dir() => {}
            // A link whose target cannot be read: a class folder on a mount that is not there,
            // not a stray file to pass over (unless hidden, as every hidden entry is).
            Err(source)
                if entry.file_type().is_ok_and(|t| t.is_symlink())
                    && !is_hidden(&entry.file_name().to_string_lossy()) =>
            {
                unreachable.push(UnreachableLink {
                    name: entry.file_name().to_string_lossy().escape_debug().to_string(),
                    target: std::fs::read_link(entry.path()).unwrap_or_default().display().to_string(),
                    problem: source.to_string(),
                });
                continue;
            }
            _ => continue,
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
    if !unreachable.is_empty() {
        unreachable.sort_by(|a, b| a.name.cmp(&b.name));
        return Err(ListError::UnreachableClassLinks { root: root.display().to_string(), links: unreachable });
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

    fn image(name: &str, bytes: u64, version: &str) -> ImageRef {
        ImageRef {
            relative: name.into(),
            source: ImageSource::Local(name.into()),
            bytes,
            version: Some(version.into()),
        }
    }

    /// A missing class folder says what stands there instead: a file of the class's name, or a
    /// folder of the same name in another Unicode normalization (macOS writes NFD; the names
    /// look the same) or letter case — locally and in an object store.
    #[test]
    fn a_missing_class_folder_names_the_file_or_near_folder_there() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("cafe\u{301}")).unwrap(); // NFD
        std::fs::create_dir_all(root.join("Sandal")).unwrap();
        std::fs::write(root.join("README.txt"), b"x").unwrap();
        let message = |class: &str| list_local_class(root, class).unwrap_err().to_string();
        let nfc = message("caf\u{e9}");
        assert!(
            nfc.contains("(`cafe\\u{301}` with its characters spelt out) has the same name in another Unicode"),
            "{nfc}"
        );
        // Case and normalization both: said so (copying the name as it looks would still fail).
        let both = message("CAF\u{c9}");
        assert!(both.contains("differs from it in letter case and in Unicode normalization"), "{both}");
        assert!(message("sandal").contains("folder `Sandal` differs from it only in letter case"));
        assert!(message("README.txt").ends_with("it is a file, not a folder; a class is a folder of images"));
        assert!(message("missing").ends_with("does not exist"), "{}", message("missing"));
        // In an object store: the root's prefixes are looked at.
        let store = crate::store::open("memory://near-miss-test/data").unwrap();
        let put = store.key("cafe\u{301}/0.png");
        futures::executor::block_on(store.store.put(&put, object_store::PutPayload::from_static(b"x"))).unwrap();
        let error = futures::executor::block_on(list_store_class(&store, "caf\u{e9}")).unwrap_err().to_string();
        assert!(error.contains("another Unicode normalization"), "{error}");
    }

    /// Modification times never make data different; names, sizes and (when both sides have
    /// one) content do, and the change is told in counts.
    #[test]
    fn data_is_compared_by_names_and_sizes_or_content_never_by_times() {
        let listing = |images: Vec<ImageRef>| ClassListing { images, skipped: Skipped::default() }.summary();
        let then = listing(vec![image("a.jpg", 10, "1"), image("b.jpg", 20, "1")]);
        let touched = listing(vec![image("a.jpg", 10, "2"), image("b.jpg", 20, "3")]);
        assert!(then.same_data(&touched) && then.versions_differ(&touched));
        let removed = listing(vec![image("a.jpg", 10, "1")]);
        assert!(!then.same_data(&removed));
        assert_eq!(then.change_to(&removed), "2 images, 30 bytes then, 1 images, 10 bytes now");
        let renamed = listing(vec![image("a.jpg", 10, "1"), image("c.jpg", 20, "1")]);
        assert!(!then.same_data(&renamed) && then.change_to(&renamed).contains("other names or sizes"));
        // Content digests: compared when both have one, over names, sizes and bytes.
        let images = vec![image("a.jpg", 10, "1"), image("b.jpg", 20, "1")];
        let hashed = |hashes: [&str; 2]| ListingSummary {
            content_digest: Some(content_digest(&images, &hashes.map(String::from))),
            ..then.clone()
        };
        let (one, other) = (hashed(["sha256:1", "sha256:2"]), hashed(["sha256:1", "sha256:3"]));
        assert!(one.same_data(&hashed(["sha256:1", "sha256:2"])) && !one.same_data(&other));
        assert!(one.change_to(&other).starts_with("same names and sizes"));
        assert!(one.same_data(&then) && then.same_data(&other), "without two digests, names and sizes decide");
    }

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

    /// A root entry linking to a folder that cannot be reached (an unmounted class folder) is an
    /// error naming the link and its target: skipped, as torchvision's ImageFolder skips it, it
    /// left a class out and shifted every later class's position label with no word. A link to a
    /// folder that is there is a class; a link to a file, a stray file.
    #[test]
    fn a_class_link_to_nothing_is_an_error_not_a_missing_class() {
        let dir = tempfile::tempdir().unwrap();
        tree(dir.path());
        std::os::unix::fs::symlink(dir.path().join("a"), dir.path().join("c")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("README.txt"), dir.path().join("d")).unwrap();
        assert_eq!(list_local_classes(dir.path()).unwrap().0, ["a", "b", "c"]);
        // A hidden one is skipped as any hidden entry is.
        std::os::unix::fs::symlink("/nowhere", dir.path().join(".cache")).unwrap();
        assert_eq!(list_local_classes(dir.path()).unwrap().0, ["a", "b", "c"]);
        std::os::unix::fs::symlink("/nonexistent/n01440764", dir.path().join("0_unmounted")).unwrap();
        std::os::unix::fs::symlink("/nonexistent/n01443537", dir.path().join("1_unmounted")).unwrap();
        let error = list_local_classes(dir.path()).unwrap_err();
        assert!(matches!(&error, ListError::UnreachableClassLinks { links, .. } if links.len() == 2), "{error:?}");
        let text = error.to_string();
        assert!(
            text.contains(
                "holds 2 link(s) to folders that cannot be reached: `0_unmounted` → `/nonexistent/n01440764` ("
            ) && text.contains("`1_unmounted` → `/nonexistent/n01443537` (")
                && text.contains("mount them, or remove the links"),
            "{text}"
        );
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

    /// Links of every shape: the walk enters a folder once, never leaves the class through a
    /// folder link, counts a file once however many names it has, and names what it skipped.
    #[test]
    fn links_cannot_loop_or_leave_the_class() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("train");
        let elsewhere = dir.path().join("elsewhere");
        for path in ["a/1.png", "a/2.png", "a/sub/3.png", "b/4.png", "c/5.png"] {
            let path = root.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"12345").unwrap();
        }
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::fs::write(elsewhere.join("far.png"), b"123").unwrap();
        std::fs::create_dir_all(elsewhere.join("folder")).unwrap();
        std::fs::write(elsewhere.join("folder/6.png"), b"123").unwrap();
        // Class a: a cycle to itself, a cycle from below, a second name of a folder, a second
        // name (soft and hard) of a file, and a file linked from outside the dataset.
        symlink(".", root.join("a/again")).unwrap();
        symlink("..", root.join("a/sub/up")).unwrap();
        symlink("sub", root.join("a/alias")).unwrap();
        symlink("1.png", root.join("a/one-more.png")).unwrap();
        std::fs::hard_link(root.join("a/2.png"), root.join("a/sub/2-hard.png")).unwrap();
        symlink(elsewhere.join("far.png"), root.join("a/far.png")).unwrap();
        // Class b: links to the dataset root, a sibling class and a folder outside the dataset.
        symlink("..", root.join("b/parent")).unwrap();
        symlink("../c", root.join("b/sibling")).unwrap();
        symlink(elsewhere.join("folder"), root.join("b/outside")).unwrap();
        // ... a file of another class, a broken link, a device and a FIFO under image names.
        symlink("../c/5.png", root.join("b/fromc.png")).unwrap();
        symlink("nowhere.png", root.join("b/dangling.png")).unwrap();
        symlink("/dev/zero", root.join("b/zero.png")).unwrap();
        let fifo = std::process::Command::new("mkfifo").arg(root.join("b/pipe.png")).status();
        let fifos = fifo.is_ok_and(|s| s.success()) as u32;

        let a = list_local_class(&root, "a").unwrap();
        let names: Vec<_> = a.images.iter().map(|i| i.relative.as_str()).collect();
        // `alias` sorts before `sub`, so sub's files are listed under it, once.
        assert_eq!(names, ["1.png", "2.png", "far.png", "alias/3.png"], "{:?}", a.skipped);
        assert_eq!(a.skipped.links, 5, "{:?}", a.skipped.link_examples);
        let reason = |path: &str| a.skipped.link_examples.iter().find(|l| l.path == path).map(|l| l.reason.clone());
        assert_eq!(reason("again"), Some(LinkSkip::Cycle));
        assert_eq!(reason("alias/up"), Some(LinkSkip::Cycle));
        assert_eq!(reason("sub"), Some(LinkSkip::Cycle));
        assert_eq!(reason("one-more.png"), Some(LinkSkip::SameFile { listed_as: "1.png".into() }));
        assert_eq!(reason("alias/2-hard.png"), Some(LinkSkip::SameFile { listed_as: "2.png".into() }));
        let text = a.skipped.describe();
        assert!(text.contains("skipped 5 link(s)") && text.contains("`again` (a folder already listed"), "{text}");

        let b = list_local_class(&root, "b").unwrap();
        let names: Vec<_> = b.images.iter().map(|i| i.relative.as_str()).collect();
        assert_eq!(names, ["4.png"], "{:?}", b.skipped);
        assert_eq!(b.skipped.links, 6 + fifos, "{:?}", b.skipped.link_examples);
        let reason = |path: &str| b.skipped.link_examples.iter().find(|l| l.path == path).map(|l| l.reason.clone());
        for outside in ["parent", "sibling", "outside"] {
            assert!(matches!(reason(outside), Some(LinkSkip::OutsideClass { .. })), "{outside}");
        }
        assert!(matches!(reason("fromc.png"), Some(LinkSkip::OtherClass { .. })));
        assert_eq!(reason("dangling.png"), Some(LinkSkip::Broken));
        assert_eq!(reason("zero.png"), Some(LinkSkip::NotAFile));
        if fifos == 1 {
            assert_eq!(reason("pipe.png"), Some(LinkSkip::NotAFile));
        }
        // A class folder that is itself a link (a dataset staged as links) is walked as usual.
        symlink(root.join("c"), root.join("d")).unwrap();
        let d = list_local_class(&root, "d").unwrap();
        assert_eq!((d.images.len(), d.skipped.links), (1, 0));
        // The marker keeps what was skipped; a listing without links serialises as before.
        let json = serde_json::to_string(&a.skipped).unwrap();
        assert_eq!(serde_json::from_str::<Skipped>(&json).unwrap(), a.skipped);
        assert!(!serde_json::to_string(&d.skipped).unwrap().contains("link"));
    }

    /// A class folder that is the dataset's root (or above it) is an error, and a file link to
    /// another class's image is skipped also when that class's folder is itself a link elsewhere.
    #[test]
    fn classes_cannot_take_other_classes_through_folder_links() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("train");
        let elsewhere = dir.path().join("elsewhere/f");
        for path in [root.join("a/1.png"), elsewhere.join("0.png")] {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"1").unwrap();
        }
        symlink(&elsewhere, root.join("f")).unwrap();
        symlink(elsewhere.join("0.png"), root.join("a/fromf.png")).unwrap();
        let a = list_local_class(&root, "a").unwrap();
        assert_eq!(a.images.len(), 1, "{:?}", a.images);
        assert!(matches!(a.skipped.link_examples[0].reason, LinkSkip::OtherClass { .. }), "{:?}", a.skipped);
        for (name, target) in [("z", "."), ("up", "..")] {
            symlink(target, root.join(name)).unwrap();
            let error = list_local_class(&root, name).unwrap_err();
            assert!(matches!(error, ListError::ClassContainsDataset { .. }), "{name}: {error}");
        }
    }

    /// Of two names of one folder, the first in the listing order is the one listed, whichever
    /// is the link.
    #[test]
    fn the_first_name_of_a_folder_in_order_is_listed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/sub1")).unwrap();
        std::fs::create_dir_all(dir.path().join("a/sub2")).unwrap();
        std::fs::write(dir.path().join("a/sub2/1.png"), b"1").unwrap();
        std::os::unix::fs::symlink("../sub2", dir.path().join("a/sub1/x")).unwrap();
        let a = list_local_class(dir.path(), "a").unwrap();
        assert_eq!(a.images.iter().map(|i| i.relative.as_str()).collect::<Vec<_>>(), ["sub1/x/1.png"]);
        assert_eq!(a.skipped.link_examples, [SkippedLink { path: "sub2".into(), reason: LinkSkip::Cycle }]);
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
