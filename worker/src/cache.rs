//! The latent cache: a class's scaled VAE latents ([n, C·h·w] f32 `.npy`) stored in an object
//! store, keyed by the dataset, the VAE encoder's fingerprint, the preprocessing version and the
//! class's file listing (names and sizes, and the files' contents where the job records them), so
//! a job with another IPC, seed, λ or t_stop reuses them without decoding or encoding a single
//! image, and a changed class folder misses the cache. A latents entry also records what it was
//! computed from ([`Source`]: the listing with its files' modification and change times or ETags, and the files'
//! contents): the same listing is a hit without reading a file; other times (a copy, a `touch`, a
//! file rewritten in place at the same size) are a hit only once the files' contents are read and
//! found the same, so no job samples from the latents of pixels that are no longer there. Modes
//! are keyed by those contents too. Every entry ends in the sha256 of its key and bytes (after
//! the `.npy` data, which numpy ignores): an entry damaged in place, or copied from another key,
//! is not used but computed again.

use std::io::Cursor;

use mgd3_common::sha256_hex;
use mgd3_common::store::{Location, get_optional, put_large};
use ndarray::Array2;
use ndarray_npy::{ReadNpyExt, WriteNpyExt};
use thiserror::Error;
use tracing::warn;

use crate::data::block_on;
use mgd3_common::imagefolder::ImageRef;

/// Bumped whenever decoding or preprocessing changes the latents of the same files.
pub const PREPROCESSING_VERSION: &str = "prep-v1";

/// Errors of the latent cache.
#[derive(Debug, Error)]
pub enum CacheError {
    /// Reading or writing the cache's store failed (after the store's own retries).
    #[error("latent cache `{url}`: `{key}`")]
    Store {
        /// The cache location's URL.
        url: String,
        /// The entry's key, relative to the cache location.
        key: String,
        /// The store's error.
        #[source]
        source: object_store::Error,
    },
}

fn short(text: &str) -> String {
    sha256_hex(text.as_bytes())[7..23].to_owned()
}

/// The cache key of one class's latents:
/// `latents/<dataset hash>/<VAE fingerprint prefix>/<PREPROCESSING_VERSION>/<wnid>-<listing hash>.npy`,
/// where the listing hash covers each image's path below the class folder and its size, and
/// `content_digest` (the class's [`ListingSummary::content_digest`](mgd3_common::imagefolder::ListingSummary::content_digest),
/// recorded for `data_fingerprint = "content"`) when given: files rewritten in place at the same
/// size, which such a job tells apart, then miss the cache too.
pub fn latent_key(
    dataset_url: &str,
    vae_fingerprint: &str,
    wnid: &str,
    images: &[ImageRef],
    content_digest: Option<&str>,
) -> String {
    // Names below the class folder (not where the dataset is mounted) and sizes.
    let mut listing: String = images.iter().map(|i| format!("{}\t{}\n", i.relative, i.bytes)).collect();
    if let Some(content) = content_digest {
        listing.push_str(&format!("content\t{content}\n"));
    }
    let vae = vae_fingerprint.trim_start_matches("sha256:");
    format!(
        "latents/{}/{}/{PREPROCESSING_VERSION}/{wnid}-{}.npy",
        short(dataset_url.trim_end_matches('/')),
        &vae[..16.min(vae.len())],
        short(&listing)
    )
}

/// The cache key of a class's k-means modes found from the latents at `latent_key`, computed
/// from files of content digest `content` ([`Source::content`]), with k = `ipc` and k-means seed
/// `seed` (`seed::kmeans_seed`): beside the latents, so the same data, VAE, preprocessing,
/// listing and contents, IPC and seed find them —
/// `modes/<latents key without .npy>/<content digest prefix>/k<ipc>-s<seed hex>.npy`. k-means is
/// deterministic in these, so cached modes are the bytes a run would find; latents computed
/// again from other contents at the same key never meet the old modes.
pub fn modes_key(latent_key: &str, content: &str, ipc: usize, seed: u64) -> String {
    let content = content.trim_start_matches("sha256:");
    format!(
        "modes/{}/{}/k{ipc}-s{seed:016x}.npy",
        latent_key.trim_end_matches(".npy"),
        &content[..16.min(content.len())]
    )
}

/// What a class's cached latents were computed from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// The class's [`ClassListing::digest`](mgd3_common::imagefolder::ClassListing::digest): names,
    /// sizes and modification and change times or ETags (`sha256:<hex>`).
    pub listing: String,
    /// The [`content_digest`](mgd3_common::imagefolder::content_digest) of its files: names, sizes
    /// and each file's sha256 (`sha256:<hex>`).
    pub content: String,
}

/// What comes between a latents entry's `.npy` data and its seal: the [`Source`], as
/// `<listing> <content>`.
const SOURCE: &[u8] = b"\nmgd3-source:";

/// A cache entry's values, and what they were computed from when the entry says
/// (latents entries do; modes entries, keyed by the contents, do not).
#[derive(Debug)]
pub struct Entry {
    /// `points × dim` values, row-major.
    pub values: Vec<f32>,
    /// What the values were computed from.
    pub source: Option<Source>,
}

/// Splits an unsealed entry body into its `.npy` data and its [`Source`], if it records one.
fn split_source(body: &[u8]) -> (&[u8], Option<Source>) {
    // The record has a fixed length (two `sha256:<64 hex>` digests and a space) at the very
    // end: looked for there, not searched for through tens of MB of latents.
    let Some(at) = body.len().checked_sub(SOURCE.len() + 2 * 71 + 1) else { return (body, None) };
    if !body[at..].starts_with(SOURCE) {
        return (body, None);
    }
    let parsed = std::str::from_utf8(&body[at + SOURCE.len()..]).ok().and_then(|text| {
        let (listing, content) = text.split_once(' ')?;
        let digest = |d: &str| d.starts_with("sha256:") && d.len() == 71 && !d.contains(char::is_whitespace);
        (digest(listing) && digest(content)).then(|| Source { listing: listing.into(), content: content.into() })
    });
    match parsed {
        Some(source) => (&body[..at], Some(source)),
        None => (body, None),
    }
}

/// The cached entry at `key` of `points` × `dim` values (row-major f32: latents in scaled latent
/// space, or modes), if present and well-formed, with what it was computed from when it says;
/// an entry of another shape or an unreadable one is logged and ignored (`None`).
///
/// # Errors
/// [`CacheError::Store`] when the store cannot be read.
pub fn load(cache: &Location, key: &str, points: usize, dim: usize) -> Result<Option<Entry>, CacheError> {
    let path = cache.key(key);
    let bytes = block_on(get_optional(cache.store.as_ref(), &path)).map_err(|source| CacheError::Store {
        url: cache.url.clone(),
        key: key.into(),
        source,
    })?;
    let Some(bytes) = bytes else { return Ok(None) };
    let body = match unseal(key, &bytes) {
        Ok(body) => body,
        Err(problem) => {
            warn!(key, problem, "ignoring a cache entry that fails its checksum; computing it again");
            return Ok(None);
        }
    };
    let (body, source) = split_source(body);
    match Array2::<f32>::read_npy(Cursor::new(body)) {
        Ok(array) if array.dim() == (points, dim) => {
            Ok(Some(Entry { values: array.into_raw_vec_and_offset().0, source }))
        }
        Ok(array) => {
            warn!(key, shape = ?array.dim(), "ignoring cached latents of the wrong shape");
            Ok(None)
        }
        Err(error) => {
            warn!(key, error = %mgd3_common::error_chain(&error), "ignoring unreadable cached latents");
            Ok(None)
        }
    }
}

/// Stores `points` × `dim` values (row-major f32) as `.npy` at `key` (multipart upload when
/// large), recording `source` after them when given (latents).
///
/// # Errors
/// [`CacheError::Store`] when the store cannot be written.
///
/// # Panics
/// If `features` does not hold `points × dim` values.
pub fn store(
    cache: &Location,
    key: &str,
    features: &[f32],
    points: usize,
    dim: usize,
    source: Option<&Source>,
) -> Result<(), CacheError> {
    let array = Array2::from_shape_vec((points, dim), features.to_vec()).expect("points × dim features");
    let mut bytes = Vec::with_capacity(features.len() * 4 + 320);
    array.write_npy(&mut bytes).expect("writing to memory");
    if let Some(source) = source {
        bytes.extend_from_slice(SOURCE);
        bytes.extend_from_slice(format!("{} {}", source.listing, source.content).as_bytes());
    }
    block_on(put_large(cache.store.as_ref(), &cache.key(key), seal(key, bytes))).map_err(|source| CacheError::Store {
        url: cache.url.clone(),
        key: key.into(),
        source,
    })
}

/// What ends every cache entry, before the hex sha256 of everything in front of it.
const SEAL: &[u8] = b"\nmgd3-sha256:";

/// The sha256 an entry at `key` holding `body` ends in (64 hex digits): of the key and the
/// body, so that an entry copied to another key (another class's) fails its check as a damaged
/// one does. Hashed as it goes: a class's latents are tens of MB.
fn entry_digest(key: &str, body: &[u8]) -> String {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    hasher.update(key.as_bytes());
    hasher.update([0]);
    hasher.update(body);
    hex::encode(hasher.finalize())
}

/// `bytes` followed by [`SEAL`] and their [`entry_digest`] at `key` (64 hex digits).
fn seal(key: &str, mut bytes: Vec<u8>) -> Vec<u8> {
    let digest = entry_digest(key, &bytes);
    bytes.extend_from_slice(SEAL);
    bytes.extend_from_slice(digest.as_bytes());
    bytes
}

/// The bytes a [`seal`]ed entry at `key` holds, or why it cannot be trusted.
fn unseal<'a>(key: &str, bytes: &'a [u8]) -> Result<&'a [u8], &'static str> {
    let trailer = SEAL.len() + 64;
    let Some(split) = bytes.len().checked_sub(trailer) else { return Err("too short to hold a checksum") };
    let (body, seal) = bytes.split_at(split);
    let Some(digest) = seal.strip_prefix(SEAL) else {
        return Err("no checksum (cut short, or written by an older mgd3)");
    };
    if entry_digest(key, body).as_bytes() != digest {
        return Err("its bytes do not match its checksum (damaged, or copied from another entry)");
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_change_with_dataset_vae_and_listing_but_not_mount_point() {
        use mgd3_common::imagefolder::ImageSource;
        let images = |root: &str, size: u64| {
            vec![
                ImageRef {
                    relative: "a.png".into(),
                    source: ImageSource::Local(format!("{root}/n01/a.png").into()),
                    bytes: size,
                    version: None,
                },
                ImageRef {
                    relative: "b.png".into(),
                    source: ImageSource::Local(format!("{root}/n01/b.png").into()),
                    bytes: 7,
                    version: None,
                },
            ]
        };
        let base = latent_key("s3://b/train", "sha256:abc", "n01", &images("/x", 5), None);
        assert_eq!(base, latent_key("s3://b/train/", "sha256:abc", "n01", &images("/y", 5), None));
        assert_ne!(base, latent_key("s3://b/val", "sha256:abc", "n01", &images("/x", 5), None));
        assert_ne!(base, latent_key("s3://b/train", "sha256:abd", "n01", &images("/x", 5), None));
        assert_ne!(base, latent_key("s3://b/train", "sha256:abc", "n01", &images("/x", 6), None));
        // Other contents at the same names and sizes, for a job that records contents.
        let content = latent_key("s3://b/train", "sha256:abc", "n01", &images("/x", 5), Some("sha256:01"));
        assert_ne!(base, content);
        assert_ne!(content, latent_key("s3://b/train", "sha256:abc", "n01", &images("/x", 5), Some("sha256:02")));
        assert!(base.contains(PREPROCESSING_VERSION));
    }

    #[test]
    fn modes_keys_differ_by_contents_ipc_and_seed_beside_their_latents() {
        let latents = "latents/d/v/prep-v1/n01-abc.npy";
        let content = format!("sha256:{}", "1".repeat(64));
        let key = modes_key(latents, &content, 10, 7);
        assert!(key.starts_with("modes/latents/d/v/prep-v1/n01-abc/") && key.ends_with(".npy"), "{key}");
        assert_ne!(key, modes_key(latents, &content, 50, 7));
        assert_ne!(key, modes_key(latents, &content, 10, 8));
        assert_ne!(key, modes_key("latents/d/v/prep-v1/n01-abd.npy", &content, 10, 7));
        // Latents computed again from other contents at the same key never meet the old modes.
        assert_ne!(key, modes_key(latents, &format!("sha256:{}", "2".repeat(64)), 10, 7));
    }

    /// A latents entry gives back what it was computed from; a modes entry records nothing.
    #[test]
    fn latents_entries_record_their_source() {
        let cache = mgd3_common::store::open("memory://latent-cache-test/source").unwrap();
        let features: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let source =
            Source { listing: format!("sha256:{}", "a".repeat(64)), content: format!("sha256:{}", "b".repeat(64)) };
        store(&cache, "l.npy", &features, 3, 4, Some(&source)).unwrap();
        let entry = load(&cache, "l.npy", 3, 4).unwrap().unwrap();
        assert_eq!((entry.values, entry.source), (features.clone(), Some(source)));
        store(&cache, "m.npy", &features, 3, 4, None).unwrap();
        let entry = load(&cache, "m.npy", 3, 4).unwrap().unwrap();
        assert_eq!((entry.values, entry.source), (features, None));
    }

    #[test]
    fn round_trips_and_rejects_wrong_shapes() {
        let cache = mgd3_common::store::open("memory://latent-cache-test/c").unwrap();
        let features: Vec<f32> = (0..12).map(|v| v as f32).collect();
        assert!(load(&cache, "k.npy", 3, 4).unwrap().is_none());
        store(&cache, "k.npy", &features, 3, 4, None).unwrap();
        assert_eq!(load(&cache, "k.npy", 3, 4).unwrap().unwrap().values, features);
        assert!(load(&cache, "k.npy", 4, 3).unwrap().is_none());
    }

    /// An entry changed in place (same size, still a well-formed `.npy`), cut short, written
    /// without a checksum or copied from another key is not used; numpy reads a sealed entry as
    /// the plain array.
    #[test]
    fn damaged_or_unsealed_entries_are_not_used() {
        let cache = mgd3_common::store::open("memory://latent-cache-test/damage").unwrap();
        let features: Vec<f32> = (0..12).map(|v| v as f32).collect();
        store(&cache, "k.npy", &features, 3, 4, None).unwrap();
        let key = cache.key("k.npy");
        let sealed = block_on(get_optional(cache.store.as_ref(), &key)).unwrap().unwrap().to_vec();
        let put = |bytes: Vec<u8>| {
            block_on(object_store::ObjectStoreExt::put(
                cache.store.as_ref(),
                &key,
                object_store::PutPayload::from(bytes),
            ))
            .unwrap();
        };
        let mut plain = Vec::new();
        Array2::from_shape_vec((3, 4), features.clone()).unwrap().write_npy(&mut plain).unwrap();
        assert!(sealed.starts_with(&plain), "the entry is the .npy, then its seal");
        let mut damaged = sealed.clone();
        let last_value = plain.len() - 1;
        damaged[last_value] ^= 0x40;
        for (what, bytes) in [("changed", damaged), ("cut", sealed[..sealed.len() - 1].to_vec()), ("unsealed", plain)] {
            put(bytes);
            assert!(load(&cache, "k.npy", 3, 4).unwrap().is_none(), "{what} entry used");
        }
        put(sealed.clone());
        assert_eq!(load(&cache, "k.npy", 3, 4).unwrap().unwrap().values, features);
        // Copied to another key (another class's entry), it is not used there.
        let other = cache.key("other.npy");
        block_on(object_store::ObjectStoreExt::put(
            cache.store.as_ref(),
            &other,
            object_store::PutPayload::from(sealed),
        ))
        .unwrap();
        assert!(load(&cache, "other.npy", 3, 4).unwrap().is_none(), "a copied entry was used");
    }
}
