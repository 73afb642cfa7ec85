//! The commit protocol of one class (shared by workers and the coordinator):
//!
//! 1. the attempt writes its files under `staging/<attempt>/<wnid>/`;
//! 2. it writes the marker `shards/<wnid>.json` **create-only** — the first attempt wins;
//! 3. the winner copies staging → `dataset/<wnid>/` and `modes/<wnid>.npy`, then deletes staging.
//!
//! A late duplicate sees the existing marker, discards its staging and helps finish publishing the
//! winner's files, so `dataset/` only ever holds one attempt's bytes. Anyone holding a marker can
//! finish an interrupted publish ([`publish`]); files merely existing prove nothing.

use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use thiserror::Error;

use crate::layout::{JobKeys, MODES_FILE, image_name};
use crate::manifest::{ClassMarker, FileDigest};
use crate::sha256_hex;
use crate::store::{Location, get_optional, put_create};

#[derive(Debug, Error)]
pub enum CommitError {
    #[error("object store `{url}`: {context}: {source}")]
    Store {
        url: String,
        context: String,
        #[source]
        source: object_store::Error,
    },
    #[error("class `{wnid}`: marker `{key}` is unreadable: {problem}")]
    BadMarker { wnid: String, key: String, problem: String },
    #[error(
        "class `{wnid}` was committed by a job with another fingerprint ({theirs}, ours {ours}); resume refuses to mix specs"
    )]
    ForeignMarker { wnid: String, theirs: String, ours: String },
    #[error(
        "class `{wnid}`: cannot finish publishing attempt `{attempt}`: `{file}` is neither in staging nor in dataset/"
    )]
    LostStaging { wnid: String, attempt: String, file: String },
}

/// Files of one distilled class.
pub struct ClassFiles {
    /// PNG bytes of image j at index j.
    pub images: Vec<Vec<u8>>,
    pub modes_npy: Vec<u8>,
}

/// How a commit ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitOutcome {
    /// This attempt's marker was written and its files published.
    Won,
    /// Another attempt had committed the class first; this attempt's files were discarded.
    Lost,
}

fn store_err(out: &Location, context: impl Into<String>) -> impl FnOnce(object_store::Error) -> CommitError {
    let (url, context) = (out.url.clone(), context.into());
    move |source| CommitError::Store { url, context, source }
}

fn digest(name: String, bytes: &[u8]) -> FileDigest {
    FileDigest { name, sha256: sha256_hex(bytes), bytes: bytes.len() as u64 }
}

/// Reads the marker of a class, if any.
pub async fn read_marker(out: &Location, keys: &JobKeys, wnid: &str) -> Result<Option<ClassMarker>, CommitError> {
    let key = out.key(&keys.marker(wnid));
    let Some(bytes) =
        get_optional(out.store.as_ref(), &key).await.map_err(store_err(out, format!("reading `{key}`")))?
    else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| CommitError::BadMarker {
        wnid: wnid.into(),
        key: key.to_string(),
        problem: e.to_string(),
    })
}

/// A marker that counts for this job: it exists and names `fingerprint`.
pub async fn committed_marker(
    out: &Location,
    keys: &JobKeys,
    wnid: &str,
    fingerprint: &str,
) -> Result<Option<ClassMarker>, CommitError> {
    match read_marker(out, keys, wnid).await? {
        Some(marker) if marker.fingerprint == fingerprint => Ok(Some(marker)),
        Some(marker) => {
            Err(CommitError::ForeignMarker { wnid: wnid.into(), theirs: marker.fingerprint, ours: fingerprint.into() })
        }
        None => Ok(None),
    }
}

/// Commits one class: staging, create-only marker, publish, cleanup. `marker` carries everything
/// but the file digests, which are computed here.
pub async fn commit_class(
    out: &Location,
    keys: &JobKeys,
    mut marker: ClassMarker,
    files: ClassFiles,
) -> Result<CommitOutcome, CommitError> {
    let (attempt, wnid) = (marker.attempt_id.clone(), marker.wnid.clone());
    let store = out.store.as_ref();
    let mut digests = Vec::with_capacity(files.images.len());
    for (j, png) in files.images.into_iter().enumerate() {
        let name = image_name(j);
        digests.push(digest(name.clone(), &png));
        let key = out.key(&keys.staging_file(&attempt, &wnid, &name));
        store.put(&key, PutPayload::from(png)).await.map_err(store_err(out, format!("staging `{key}`")))?;
    }
    marker.images = digests;
    marker.modes = digest(MODES_FILE.into(), &files.modes_npy);
    let key = out.key(&keys.staging_file(&attempt, &wnid, MODES_FILE));
    store.put(&key, PutPayload::from(files.modes_npy)).await.map_err(store_err(out, format!("staging `{key}`")))?;

    let marker_key = out.key(&keys.marker(&wnid));
    let bytes = serde_json::to_vec_pretty(&marker).expect("serialisable marker");
    let won = put_create(store, &marker_key, bytes)
        .await
        .map_err(store_err(out, format!("writing marker `{marker_key}`")))?;
    if won {
        publish(out, keys, &marker).await?;
        return Ok(CommitOutcome::Won);
    }
    delete_prefix(out, &keys.staging_file(&attempt, &wnid, "")).await?;
    let winner =
        committed_marker(out, keys, &wnid, &marker.fingerprint).await?.ok_or_else(|| CommitError::BadMarker {
            wnid: wnid.clone(),
            key: marker_key.to_string(),
            problem: "create-only put reported an existing marker that cannot be read back".into(),
        })?;
    publish(out, keys, &winner).await?;
    Ok(CommitOutcome::Lost)
}

/// Copies the marker's attempt from staging into `dataset/` and `modes/` (skipping files already
/// there with the right size), then deletes that staging folder. Idempotent.
pub async fn publish(out: &Location, keys: &JobKeys, marker: &ClassMarker) -> Result<(), CommitError> {
    let store = out.store.as_ref();
    let (attempt, wnid) = (&marker.attempt_id, &marker.wnid);
    let mut targets: Vec<(&FileDigest, String)> =
        marker.images.iter().enumerate().map(|(j, d)| (d, keys.dataset_image(wnid, j))).collect();
    targets.push((&marker.modes, keys.modes(wnid)));
    for (file, target) in targets {
        let target = out.key(&target);
        if let Ok(meta) = store.head(&target).await
            && meta.size == file.bytes
        {
            continue;
        }
        let source = out.key(&keys.staging_file(attempt, wnid, &file.name));
        match store.copy(&source, &target).await {
            Ok(()) => {}
            Err(object_store::Error::NotFound { .. }) => {
                // Another publisher may have finished and removed staging in the meantime.
                let done = store.head(&target).await.is_ok_and(|m| m.size == file.bytes);
                if !done {
                    return Err(CommitError::LostStaging {
                        wnid: wnid.clone(),
                        attempt: attempt.clone(),
                        file: file.name.clone(),
                    });
                }
            }
            Err(e) => return Err(store_err(out, format!("publishing `{target}`"))(e)),
        }
    }
    delete_prefix(out, &keys.staging_file(attempt, wnid, "")).await
}

/// Deletes every object under `relative` (a folder).
pub async fn delete_prefix(out: &Location, relative: &str) -> Result<(), CommitError> {
    let prefix = out.key(relative);
    let objects: Vec<_> =
        out.store.list(Some(&prefix)).try_collect().await.map_err(store_err(out, format!("listing `{prefix}`")))?;
    for object in objects {
        match out.store.delete(&object.location).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(store_err(out, format!("deleting `{}`", object.location))(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::StageSeconds;
    use crate::store::open;

    fn marker(attempt: &str, fingerprint: &str) -> ClassMarker {
        ClassMarker {
            schema_version: 1,
            job_id: "job".into(),
            fingerprint: fingerprint.into(),
            attempt_id: attempt.into(),
            worker_id: format!("w-{attempt}"),
            wnid: "n01".into(),
            label: 1,
            class_index: 0,
            images: vec![],
            modes: FileDigest { name: String::new(), sha256: String::new(), bytes: 0 },
            real_images: 5,
            timings: StageSeconds::default(),
            committed_unix_ms: 0,
            latent_cache_hit: false,
        }
    }

    fn files(tag: u8, n: usize) -> ClassFiles {
        ClassFiles { images: (0..n).map(|j| vec![tag; 10 + j]).collect(), modes_npy: vec![tag; 7] }
    }

    async fn dataset_bytes(out: &Location, keys: &JobKeys, n: usize) -> Vec<Vec<u8>> {
        let mut all = vec![];
        for j in 0..n {
            let key = out.key(&keys.dataset_image("n01", j));
            all.push(out.store.get(&key).await.unwrap().bytes().await.unwrap().to_vec());
        }
        all
    }

    #[tokio::test]
    async fn racing_attempts_have_one_winner_and_no_mixed_files() {
        for round in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let out = open(&dir.path().display().to_string()).unwrap();
            let keys = JobKeys::new("job");
            let (a, b) = tokio::join!(
                commit_class(&out, &keys, marker("a", "fp"), files(1, 4)),
                commit_class(&out, &keys, marker("b", "fp"), files(2, 4)),
            );
            let outcomes = [a.unwrap(), b.unwrap()];
            assert_eq!(outcomes.iter().filter(|o| **o == CommitOutcome::Won).count(), 1, "round {round}");
            let winner = read_marker(&out, &keys, "n01").await.unwrap().unwrap();
            let tag = if winner.attempt_id == "a" { 1 } else { 2 };
            assert_eq!(dataset_bytes(&out, &keys, 4).await, files(tag, 4).images, "round {round}");
            let staging: Vec<_> = out.store.list(Some(&out.key("jobs/job/staging"))).try_collect().await.unwrap();
            assert!(staging.is_empty(), "staging left behind: {staging:?}");
        }
    }

    #[tokio::test]
    async fn interrupted_publish_is_finished_from_the_marker() {
        let out = open("memory://commit-interrupted/out").unwrap();
        let keys = JobKeys::new("job");
        // Simulate a winner that died after writing staging and the marker.
        let mut m = marker("dead", "fp");
        let f = files(9, 3);
        m.images = f.images.iter().enumerate().map(|(j, b)| digest(image_name(j), b)).collect();
        m.modes = digest(MODES_FILE.into(), &f.modes_npy);
        for (j, b) in f.images.iter().enumerate() {
            out.store.put(&out.key(&keys.staging_file("dead", "n01", &image_name(j))), b.clone().into()).await.unwrap();
        }
        out.store
            .put(&out.key(&keys.staging_file("dead", "n01", MODES_FILE)), f.modes_npy.clone().into())
            .await
            .unwrap();
        put_create(out.store.as_ref(), &out.key(&keys.marker("n01")), serde_json::to_vec(&m).unwrap()).await.unwrap();
        // A late attempt loses and finishes the winner's publish.
        let outcome = commit_class(&out, &keys, marker("late", "fp"), files(3, 3)).await.unwrap();
        assert_eq!(outcome, CommitOutcome::Lost);
        assert_eq!(dataset_bytes(&out, &keys, 3).await, f.images);
        // Publishing again is a no-op.
        publish(&out, &keys, &m).await.unwrap();
    }

    #[tokio::test]
    async fn markers_of_another_spec_are_refused() {
        let out = open("memory://commit-foreign/out").unwrap();
        let keys = JobKeys::new("job");
        commit_class(&out, &keys, marker("a", "fp-old"), files(1, 2)).await.unwrap();
        let err = commit_class(&out, &keys, marker("b", "fp-new"), files(2, 2)).await.unwrap_err();
        assert!(matches!(err, CommitError::ForeignMarker { .. }), "{err}");
        assert!(committed_marker(&out, &keys, "n01", "fp-new").await.is_err());
        assert!(committed_marker(&out, &keys, "n02", "fp-new").await.unwrap().is_none());
    }
}
