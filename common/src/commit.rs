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
use crate::manifest::{ClassMarker, FileDigest, SheetRecord};
use crate::sha256_hex;
use crate::store::{Location, get_optional, put_create, retry_idempotent};

/// Whether `location`, under class folder `folder`, is a file mgd3 could have written there: an
/// image directly in the folder (`<j>.png`). Only such files are removed as strays; anything else
/// (a sub-folder's contents, another extension) is someone else's.
pub fn written_by_mgd3(folder: &object_store::path::Path, location: &object_store::path::Path) -> bool {
    let Some(rest) = location.as_ref().strip_prefix(folder.as_ref()) else { return false };
    let rest = rest.trim_start_matches('/');
    !rest.contains('/') && rest.ends_with(".png")
}

/// Why committing, publishing or checking a class's files failed.
#[derive(Debug, Error)]
pub enum CommitError {
    /// An object-store call failed (after retries where the call is idempotent).
    #[error("object store `{url}`: {context}")]
    Store {
        /// The store's URL.
        url: String,
        /// What was being done, naming the key (reading, staging, publishing, ...).
        context: String,
        /// What the store answered.
        #[source]
        source: object_store::Error,
    },
    /// A class's marker exists but cannot be parsed.
    #[error("class `{wnid}`: marker `{key}` is unreadable: {problem}")]
    BadMarker {
        /// The class.
        wnid: String,
        /// The marker's key in the store.
        key: String,
        /// Why it cannot be used.
        problem: String,
    },
    /// A class's marker names another job fingerprint: the output holds another spec's work.
    #[error(
        "class `{wnid}` was committed by a job with another fingerprint ({theirs}, ours {ours}); resume refuses to mix specs"
    )]
    ForeignMarker {
        /// The class.
        wnid: String,
        /// The fingerprint in the marker.
        theirs: String,
        /// This job's fingerprint.
        ours: String,
    },
    /// A file the marker lists is neither published intact nor in staging any more: the class must be
    /// distilled again.
    #[error(
        "class `{wnid}`: cannot restore `{file}` of attempt `{attempt}`: the published copy is missing or damaged and the staging copy is gone"
    )]
    LostStaging {
        /// The class.
        wnid: String,
        /// The attempt whose files the marker lists.
        attempt: String,
        /// The file's name (`<j>.png` or `modes.npy`).
        file: String,
    },
    /// A local staging copy (`<name>#<digits>`) could not be deleted.
    #[error("cannot delete `{path}`")]
    Local {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Files of one distilled class.
pub struct ClassFiles {
    /// PNG bytes of image j at index j.
    pub images: Vec<Vec<u8>>,
    /// The class's modes as `.npy` bytes (`modes.npy`).
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

/// The digest a worker reports with a finished shard and the coordinator recomputes from the
/// store before it accepts the completion: sha256 over the image digests of the shard's markers,
/// class after class in shard order, one per line, as `sha256:<hex>`.
pub fn manifest_digest<'a>(markers: impl IntoIterator<Item = &'a ClassMarker>) -> String {
    let digests: Vec<&str> = markers.into_iter().flat_map(|m| m.images.iter().map(|d| d.sha256.as_str())).collect();
    sha256_hex(digests.join("\n").as_bytes())
}

/// Reads the marker of a class, if any.
///
/// # Errors
/// [`CommitError::Store`] when the store cannot be read; [`CommitError::BadMarker`] when the marker
/// cannot be parsed.
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
///
/// # Errors
/// [`CommitError::ForeignMarker`] when the marker names another fingerprint; the errors of
/// [`read_marker`].
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
///
/// # Errors
/// [`CommitError::Store`] when staging, the marker write or publishing fails;
/// [`CommitError::BadMarker`] when an existing marker cannot be read back; the errors of
/// [`publish`].
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
        let payload = PutPayload::from(png);
        retry_idempotent(|| store.put(&key, payload.clone()))
            .await
            .map_err(store_err(out, format!("staging `{key}`")))?;
    }
    marker.images = digests;
    marker.modes = digest(MODES_FILE.into(), &files.modes_npy);
    let key = out.key(&keys.staging_file(&attempt, &wnid, MODES_FILE));
    let payload = PutPayload::from(files.modes_npy);
    retry_idempotent(|| store.put(&key, payload.clone())).await.map_err(store_err(out, format!("staging `{key}`")))?;

    let marker_key = out.key(&keys.marker(&wnid));
    let bytes = serde_json::to_vec_pretty(&marker).expect("serialisable marker");
    // Retried when the connection dropped mid-request: a create that did happen then reads as
    // "already exists", which the marker read below tells apart from another attempt's win.
    let won = retry_idempotent(|| put_create(store, &marker_key, bytes.clone()))
        .await
        .map_err(store_err(out, format!("writing marker `{marker_key}`")))?;
    if won {
        publish(out, keys, &marker, Check::Size).await?;
        return Ok(CommitOutcome::Won);
    }
    let winner =
        committed_marker(out, keys, &wnid, &marker.fingerprint).await?.ok_or_else(|| CommitError::BadMarker {
            wnid: wnid.clone(),
            key: marker_key.to_string(),
            problem: "create-only put reported an existing marker that cannot be read back".into(),
        })?;
    if winner.attempt_id == attempt {
        publish(out, keys, &winner, Check::Size).await?;
        return Ok(CommitOutcome::Won);
    }
    delete_prefix(out, &keys.staging_file(&attempt, &wnid, "")).await?;
    publish(out, keys, &winner, Check::Size).await?;
    Ok(CommitOutcome::Lost)
}

/// How [`publish`] decides that a published file is already right.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// Right size: enough right after this process copied it (the commit path).
    Size,
    /// Right sha256, read back in full: what `resume` and `verify` use, so that a file damaged
    /// in place is found.
    Content,
}

/// Whether the object at `key` holds exactly the file `file` describes.
async fn in_place(store: &dyn ObjectStore, key: &object_store::path::Path, file: &FileDigest, check: Check) -> bool {
    match check {
        Check::Size => store.head(key).await.is_ok_and(|meta| meta.size == file.bytes),
        Check::Content => match store.get(key).await {
            Ok(found) => found.bytes().await.is_ok_and(|bytes| digest(String::new(), &bytes).sha256 == file.sha256),
            Err(_) => false,
        },
    }
}

/// True for the local store's staging copy of `name` (`<name>#<digits>`), which a process
/// killed while writing leaves behind.
fn staging_copy_of(candidate: &str, name: &str) -> bool {
    candidate
        .strip_prefix(name)
        .and_then(|rest| rest.strip_prefix('#'))
        .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
}

/// Copies the marker's attempt from staging into `dataset/` and `modes/` (skipping files already
/// in place by `check`), deletes every other object in the class's `dataset/<wnid>/` folder and
/// leftover staging copies of its modes file (so the published tree holds exactly the files the
/// marker lists, also after a crash), then deletes the attempt's staging folder. Idempotent.
///
/// # Errors
/// [`CommitError::LostStaging`] when a file is neither in place nor in staging (the class must be
/// redone); [`CommitError::Store`] for store failures; [`CommitError::Local`] when a local
/// staging copy cannot be deleted.
pub async fn publish(out: &Location, keys: &JobKeys, marker: &ClassMarker, check: Check) -> Result<(), CommitError> {
    let store = out.store.as_ref();
    let (attempt, wnid) = (&marker.attempt_id, &marker.wnid);
    let mut targets: Vec<(&FileDigest, String)> =
        marker.images.iter().enumerate().map(|(j, d)| (d, keys.dataset_image(wnid, j))).collect();
    targets.push((&marker.modes, keys.modes(wnid)));
    let wanted: std::collections::HashSet<object_store::path::Path> =
        targets.iter().map(|(_, target)| out.key(target)).collect();
    for (file, target) in targets {
        let target = out.key(&target);
        if in_place(store, &target, file, check).await {
            continue;
        }
        let source = out.key(&keys.staging_file(attempt, wnid, &file.name));
        match retry_idempotent(|| store.copy(&source, &target)).await {
            Ok(()) => {}
            Err(e) if crate::store::is_not_found(&e) => {
                // Another publisher may have finished and removed staging in the meantime.
                let done = in_place(store, &target, file, check).await;
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
    // Exactly the marker's files: any other image directly in the class folder goes (a file of
    // another attempt, a staging copy left by a crash), and so do staging copies of the modes
    // file; what mgd3 never writes there (a sub-folder, another job's output, a user's notes)
    // is not the class's to remove, and is left for `verify` to name.
    let folder = format!("{}/dataset/{wnid}", keys.root());
    // Retried through an outage like every other call of a commit: a listing that fails here
    // would fail the class after its files are published.
    let folder_key = out.key(&folder);
    let present: Vec<_> = retry_idempotent(|| store.list(Some(&folder_key)).try_collect::<Vec<_>>())
        .await
        .map_err(store_err(out, format!("listing `{folder}`")))?;
    for stray in present.into_iter().filter(|o| !wanted.contains(&o.location)) {
        if !written_by_mgd3(&folder_key, &stray.location) {
            tracing::warn!(wnid = %wnid, file = %stray.location, "left in place: a file in the class folder that mgd3 does not write (move it out of the job's dataset folder by hand)");
            continue;
        }
        match retry_idempotent(|| store.delete(&stray.location)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                tracing::info!(wnid = %wnid, file = %stray.location, "removed a file the class's marker does not list");
            }
            Err(e) => return Err(store_err(out, format!("deleting `{}`", stray.location))(e)),
        }
    }
    // Staging copies: all of them when checking by content (resume: nobody else publishes),
    // otherwise only those too old to be a racing publisher's copy in progress.
    let min_age = if check == Check::Content { std::time::Duration::ZERO } else { STALE_STAGING_COPY };
    remove_staging_copies(out, &folder, "", min_age)?;
    remove_staging_copies(out, &format!("{}/modes", keys.root()), &format!("{wnid}.npy#"), min_age)?;
    delete_prefix(out, &keys.staging_file(attempt, wnid, "")).await
}

/// One thing wrong with a committed class's published files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileProblem {
    /// The object, relative to the store location.
    pub file: String,
    /// What is wrong (missing, wrong sha256, not listed in the marker, a staging copy).
    pub problem: String,
}

/// Checks the published files of a committed class against its marker, repairing nothing:
/// every listed file must hold the marker's sha256, the class folder nothing else, and its
/// contact sheet, if any, must be the one its committing attempt recorded ([`check_sheet`]).
/// Returns the number of files read, the problems found, and whether the class has no contact
/// sheet it can show though its marker says its attempt made one (gone, or half of the pair of
/// sheet and record: not a problem of the dataset, a note).
///
/// # Errors
/// [`CommitError::Store`] when the store cannot be listed.
pub async fn verify_class(
    out: &Location,
    keys: &JobKeys,
    marker: &ClassMarker,
) -> Result<(u64, Vec<FileProblem>, bool), CommitError> {
    let store = out.store.as_ref();
    let wnid = &marker.wnid;
    let mut targets: Vec<(&FileDigest, String)> =
        marker.images.iter().enumerate().map(|(j, d)| (d, keys.dataset_image(wnid, j))).collect();
    targets.push((&marker.modes, keys.modes(wnid)));
    let mut problems = Vec::new();
    let wanted: std::collections::HashSet<object_store::path::Path> =
        targets.iter().map(|(_, target)| out.key(target)).collect();
    for (file, target) in &targets {
        let key = out.key(target);
        let problem = match crate::store::get_bytes(store, &key).await {
            Err(object_store::Error::NotFound { .. }) => Some("missing".to_owned()),
            Err(e) => Some(format!("unreadable: {e}")),
            Ok(bytes) => {
                let actual = digest(String::new(), &bytes).sha256;
                (actual != file.sha256).then(|| {
                    format!(
                        "sha256 {actual} ({} bytes), the marker says {} ({} bytes)",
                        bytes.len(),
                        file.sha256,
                        file.bytes
                    )
                })
            }
        };
        if let Some(problem) = problem {
            problems.push(FileProblem { file: target.clone(), problem });
        }
    }
    let folder = out.key(&format!("{}/dataset/{wnid}", keys.root()));
    let present: Vec<_> = retry_idempotent(|| store.list(Some(&folder)).try_collect::<Vec<_>>())
        .await
        .map_err(store_err(out, format!("listing `{folder}`")))?;
    for stray in present.into_iter().filter(|o| !wanted.contains(&o.location)) {
        let problem = if written_by_mgd3(&folder, &stray.location) {
            "not listed in the marker".into()
        } else {
            "not listed in the marker, and not a file mgd3 writes there (another job's output, someone's file): \
             `resume` leaves it in place; move it out of the job's dataset folder by hand"
                .into()
        };
        problems.push(FileProblem { file: stray.location.to_string(), problem });
    }
    let staging = staging_copies(out, &format!("{}/dataset/{wnid}", keys.root()), "")
        .into_iter()
        .chain(staging_copies(out, &format!("{}/modes", keys.root()), &format!("{wnid}.npy#")));
    for path in staging {
        problems.push(FileProblem {
            file: path.display().to_string(),
            problem: "a staging copy left by an interrupted write".into(),
        });
    }
    let mut files = targets.len() as u64;
    let mut sheet_missing = false;
    match check_sheet(&out.child(keys.root()), marker).await? {
        SheetCheck::Absent => sheet_missing = marker.sheet_record,
        SheetCheck::Incomplete(_) => sheet_missing = true,
        SheetCheck::Found(_) => files += 1,
        SheetCheck::Wrong(problem) => {
            files += 1;
            problems.push(FileProblem { file: format!("{}/{}", keys.root(), problem.file), problem: problem.problem });
        }
    }
    Ok((files, problems, sheet_missing))
}

/// What a class's contact sheet is, checked against its record ([`SheetRecord`]) and the
/// class's marker by [`check_sheet`].
#[derive(Clone, Debug, PartialEq)]
pub enum SheetCheck {
    /// No sheet and no record: none was written (the spec turned them off, making it failed,
    /// the worker stopped first).
    Absent,
    /// The sheet the committing attempt recorded, or an earlier version's (unrecorded).
    Found(FoundSheet),
    /// A sheet or record that is not what the committing attempt wrote for this class.
    Wrong(FileProblem),
    /// A sheet without its record, or a record without its sheet: a worker stopped between the
    /// two writes, or one was deleted. Nothing says the sheet is the class's: not shown, but no
    /// damage to the dataset either (`verify` notes it).
    Incomplete(FileProblem),
}

/// A contact sheet [`check_sheet`] found right (or could not check: an earlier version's).
#[derive(Clone, Debug, PartialEq)]
pub struct FoundSheet {
    /// Its record; `None` for a sheet of an earlier version, which wrote no records (its marker
    /// does not promise one): shown as it is, unchecked.
    pub record: Option<SheetRecord>,
    /// The whole sheet.
    pub bytes: bytes::Bytes,
}

/// Checks the contact sheet of a committed class in its job's folder `job_dir`
/// (`<out>/jobs/<job>`; the problem's file is named relative to it), read in full: its record
/// must name the class, the job and the attempt of `marker`, and the sheet must hold the
/// record's sha256 (by size alone, another class's sheet cut to the same size passed).
///
/// # Errors
/// [`CommitError::Store`] when the sheet or its record cannot be read.
pub async fn check_sheet(job_dir: &Location, marker: &ClassMarker) -> Result<SheetCheck, CommitError> {
    let out = job_dir;
    let store = out.store.as_ref();
    let wnid = &marker.wnid;
    let (sheet_key, record_key) = (JobKeys::contact_sheet_in_job(wnid), JobKeys::contact_sheet_record_in_job(wnid));
    let record_location = out.key(&record_key);
    let record =
        get_optional(store, &record_location).await.map_err(store_err(out, format!("reading `{record_location}`")))?;
    let sheet_location = out.key(&sheet_key);
    let sheet =
        get_optional(store, &sheet_location).await.map_err(store_err(out, format!("reading `{sheet_location}`")))?;
    let wrong = |file: &str, problem: String| Ok(SheetCheck::Wrong(FileProblem { file: file.to_owned(), problem }));
    let incomplete =
        |file: &str, problem: String| Ok(SheetCheck::Incomplete(FileProblem { file: file.to_owned(), problem }));
    let (bytes, record) = match (sheet, record) {
        (None, None) => return Ok(SheetCheck::Absent),
        (Some(bytes), None) if !marker.sheet_record => {
            return Ok(SheetCheck::Found(FoundSheet { record: None, bytes }));
        }
        (Some(_), None) => {
            return incomplete(
                &sheet_key,
                "has no record (`contact_sheets/<class>.json`, written right after the sheet): it cannot be told \
                 from another class's or attempt's sheet"
                    .into(),
            );
        }
        (None, Some(_)) => return incomplete(&record_key, "records a contact sheet that is not there".into()),
        (Some(sheet), Some(record)) => (sheet, record),
    };
    let record: SheetRecord = match serde_json::from_slice(&record) {
        Ok(record) => record,
        Err(error) => return wrong(&record_key, format!("unreadable: {error}")),
    };
    let canonical = record
        .sha256
        .strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    if !canonical {
        return wrong(
            &record_key,
            format!("gives sha256 `{}`, not `sha256:` and 64 lowercase hex digits as mgd3 writes it", record.sha256),
        );
    }
    if record.wnid != *wnid || record.job_id != marker.job_id {
        return wrong(
            &sheet_key,
            format!("is the contact sheet of class `{}` of job `{}` (its record says so)", record.wnid, record.job_id),
        );
    }
    if record.attempt_id != marker.attempt_id {
        return wrong(
            &sheet_key,
            format!(
                "was made by attempt `{}`, not by `{}`, whose images the class's marker lists",
                record.attempt_id, marker.attempt_id
            ),
        );
    }
    let actual = sha256_hex(&bytes);
    if actual != record.sha256 {
        return wrong(
            &sheet_key,
            format!(
                "{actual} ({} bytes), its record says {} ({} bytes): the sheet or its record changed since they were \
                 written",
                bytes.len(),
                record.sha256,
                record.bytes
            ),
        );
    }
    Ok(SheetCheck::Found(FoundSheet { record: Some(record), bytes }))
}

/// The record of a contact sheet of `bytes`, made by the attempt that committed `marker`.
pub fn sheet_record(marker: &ClassMarker, bytes: &[u8]) -> SheetRecord {
    SheetRecord {
        schema_version: crate::manifest::SCHEMA_VERSION,
        job_id: marker.job_id.clone(),
        wnid: marker.wnid.clone(),
        attempt_id: marker.attempt_id.clone(),
        sha256: sha256_hex(bytes),
        bytes: bytes.len() as u64,
    }
}

/// Deletes a class's contact sheet and its record (the record first: a sheet left without one is
/// never shown as verified).
///
/// # Errors
/// [`CommitError::Store`] when a delete fails.
pub async fn remove_sheet(out: &Location, keys: &JobKeys, wnid: &str) -> Result<(), CommitError> {
    delete_in_order(out, [keys.contact_sheet_record(wnid), keys.contact_sheet(wnid)]).await
}

/// Deletes `keys` one after the other (a missing one is no error).
async fn delete_in_order(out: &Location, keys: impl IntoIterator<Item = String>) -> Result<(), CommitError> {
    for key in keys {
        let key = out.key(&key);
        match retry_idempotent(|| out.store.delete(&key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(store_err(out, format!("deleting `{key}`"))(e)),
        }
    }
    Ok(())
}

/// What [`repair_sheets`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SheetRepair {
    /// Classes whose sheet and record were found in another class's place (swapped or copied
    /// by hand) and put back in their own.
    pub restored: Vec<String>,
    /// Classes whose sheet was not their committing attempt's and was removed, with why.
    pub removed: Vec<(String, String)>,
    /// Files that could not be removed (a folder where the sheet goes), with the error: left in
    /// place for a person.
    pub left: Vec<(String, String)>,
}

/// Puts every class's contact sheet in order, in the job's folder `job_dir`, against the
/// classes' `markers`: a sheet (with its record) that is another class's of this job, intact
/// and made by that class's committing attempt, goes back to that class's place when that
/// place does not already hold its right sheet; whatever else is wrong ([`check_sheet`]) is
/// removed, sheet and record. A right sheet is never touched.
///
/// # Errors
/// [`CommitError::Store`] when a sheet or record cannot be read or written back.
pub async fn repair_sheets(job_dir: &Location, markers: &[ClassMarker]) -> Result<SheetRepair, CommitError> {
    let store = job_dir.store.as_ref();
    let mut wrong: Vec<(&ClassMarker, FileProblem)> = Vec::new();
    for marker in markers {
        // Half a pair (a sheet without its record) cannot be shown as the class's either: it goes.
        if let SheetCheck::Wrong(problem) | SheetCheck::Incomplete(problem) = check_sheet(job_dir, marker).await? {
            wrong.push((marker, problem));
        }
    }
    let mut repair = SheetRepair::default();
    if wrong.is_empty() {
        return Ok(repair);
    }
    let read = |key: String| async move {
        let location = job_dir.key(&key);
        get_optional(store, &location).await.map_err(store_err(job_dir, format!("reading `{location}`")))
    };
    // What each wrong place holds that is some other class's own sheet, read before anything
    // is written (two classes' sheets swapped fill each other's places).
    let mut found: std::collections::HashMap<String, (bytes::Bytes, bytes::Bytes)> = Default::default();
    for (marker, _) in &wrong {
        let (Some(sheet), Some(record_bytes)) = (
            read(JobKeys::contact_sheet_in_job(&marker.wnid)).await?,
            read(JobKeys::contact_sheet_record_in_job(&marker.wnid)).await?,
        ) else {
            continue;
        };
        let Ok(record) = serde_json::from_slice::<SheetRecord>(&record_bytes) else { continue };
        let owner = markers.iter().find(|m| m.wnid == record.wnid && m.wnid != marker.wnid);
        if let Some(owner) = owner
            && record.job_id == owner.job_id
            && record.attempt_id == owner.attempt_id
            && sha256_hex(&sheet) == record.sha256
        {
            found.entry(owner.wnid.clone()).or_insert((sheet, record_bytes));
        }
    }
    let wrong_places: std::collections::HashSet<&str> = wrong.iter().map(|(m, _)| m.wnid.as_str()).collect();
    for (wnid, (sheet, record)) in found {
        // A class whose own place holds its right sheet keeps it; the copy elsewhere goes below.
        let own_place_right = !wrong_places.contains(wnid.as_str())
            && matches!(
                check_sheet(job_dir, markers.iter().find(|m| m.wnid == wnid).expect("an owner")).await?,
                SheetCheck::Found(_)
            );
        if own_place_right {
            continue;
        }
        for (key, bytes) in
            [(JobKeys::contact_sheet_in_job(&wnid), sheet), (JobKeys::contact_sheet_record_in_job(&wnid), record)]
        {
            let location = job_dir.key(&key);
            retry_idempotent(|| store.put(&location, bytes.clone().into()))
                .await
                .map_err(store_err(job_dir, format!("writing `{location}`")))?;
        }
        repair.restored.push(wnid);
    }
    repair.restored.sort();
    for (marker, problem) in wrong {
        if repair.restored.contains(&marker.wnid) {
            continue;
        }
        for key in [JobKeys::contact_sheet_record_in_job(&marker.wnid), JobKeys::contact_sheet_in_job(&marker.wnid)] {
            let location = job_dir.key(&key);
            match retry_idempotent(|| store.delete(&location)).await {
                Ok(()) => {}
                Err(e) if crate::store::is_not_found(&e) => {}
                Err(e) => repair.left.push((key, e.to_string())),
            }
        }
        repair.removed.push((marker.wnid.clone(), format!("`{}` {}", problem.file, problem.problem)));
    }
    Ok(repair)
}

/// Withdraws a class's commit so that it is distilled again: deletes its marker first (a crash
/// after that leaves an uncommitted class), then its published files and modes.
///
/// # Errors
/// [`CommitError::Store`] when a delete fails.
pub async fn uncommit(out: &Location, keys: &JobKeys, wnid: &str) -> Result<(), CommitError> {
    delete_in_order(out, [keys.marker(wnid), keys.modes(wnid)]).await?;
    // The old attempt's contact sheet shows images that are withdrawn.
    remove_sheet(out, keys, wnid).await?;
    delete_prefix(out, &format!("{}/dataset/{wnid}", keys.root())).await
}

/// The local store's staging copies (`<name>#<digits>`) directly in the folder `relative`, of
/// names starting with `name_prefix`: what a process killed while writing leaves behind. Only a
/// store on the local file system makes them (and its listings hide them); elsewhere none.
pub fn staging_copies(out: &Location, relative: &str, name_prefix: &str) -> Vec<std::path::PathBuf> {
    let Some(dir) = out.local_path(relative) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|entry| {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { return false };
            name.starts_with(name_prefix)
                && name.rsplit_once('#').is_some_and(|(base, _)| staging_copy_of(name, base))
                && entry.file_type().is_ok_and(|t| t.is_file())
        })
        .map(|entry| entry.path())
        .collect()
}

/// A staging copy younger than this may belong to a copy in progress (another publisher of the
/// same class): copying one PNG or modes file takes milliseconds, so an older one is left over.
pub const STALE_STAGING_COPY: std::time::Duration = std::time::Duration::from_secs(10);

/// Deletes [`staging_copies`] of `relative` last modified at least `min_age` ago; returns how
/// many. Zero `min_age` when no other process can be writing there (recovery, resume).
///
/// # Errors
/// [`CommitError::Local`] when one cannot be deleted.
pub fn remove_staging_copies(
    out: &Location,
    relative: &str,
    name_prefix: &str,
    min_age: std::time::Duration,
) -> Result<usize, CommitError> {
    let old_enough = |path: &std::path::PathBuf| {
        min_age.is_zero()
            || std::fs::metadata(path)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age >= min_age))
    };
    let copies: Vec<_> = staging_copies(out, relative, name_prefix).into_iter().filter(old_enough).collect();
    for path in &copies {
        match std::fs::remove_file(path) {
            Ok(()) => tracing::info!(file = %path.display(), "removed a staging copy left by an interrupted write"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(CommitError::Local { path: path.display().to_string(), source }),
        }
    }
    Ok(copies.len())
}

/// Deletes every object under `relative` (a folder).
///
/// # Errors
/// [`CommitError::Store`] when the folder cannot be listed or an object cannot be deleted.
pub async fn delete_prefix(out: &Location, relative: &str) -> Result<(), CommitError> {
    let prefix = out.key(relative);
    let objects: Vec<_> = retry_idempotent(|| out.store.list(Some(&prefix)).try_collect::<Vec<_>>())
        .await
        .map_err(store_err(out, format!("listing `{prefix}`")))?;
    for object in objects {
        // Retried through an outage as the listing is: a delete cut off mid-request came back
        // failed long before the client's retry budget (the S3 outage test, once in several
        // runs), failing the attempt after its class had committed.
        match retry_idempotent(|| out.store.delete(&object.location)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(store_err(out, format!("deleting `{}`", object.location))(e)),
        }
    }
    // A local store lists folders, even empty ones, as prefixes: remove what is left of the
    // folder too, or a listing keeps showing it (object stores have no folders to leave behind).
    if let Some(root) = &out.local_root {
        let folder = root.join(relative);
        match std::fs::remove_dir_all(&folder) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(CommitError::Local { path: folder.display().to_string(), source }),
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
            modes_cache_hit: false,
            skipped: Default::default(),
            quality: None,
            embedding: None,
            versions_changed: false,
            data: None,
            sheet_record: false,
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
        publish(&out, &keys, &m, Check::Content).await.unwrap();
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

    /// A contact sheet is checked against its record and its class's commit: each kind of wrong
    /// sheet is named (another class's, another attempt's, changed, without its record, a record
    /// without its sheet), and a sheet of the same size but other bytes is found by its sha256.
    #[tokio::test]
    async fn contact_sheets_are_checked_against_their_record_and_commit() {
        let out = open("memory://commit-sheets/out").unwrap();
        let keys = JobKeys::new("job");
        let mut m = marker("a", "fp");
        m.sheet_record = true;
        let job_dir = out.child(keys.root());
        let (sheet_key, record_key) = (out.key(&keys.contact_sheet("n01")), out.key(&keys.contact_sheet_record("n01")));
        let put = |key: &object_store::path::Path, bytes: Vec<u8>| {
            let (out, key) = (out.clone(), key.clone());
            async move { out.store.put(&key, bytes.into()).await.unwrap() }
        };
        let record_of = |marker: &ClassMarker, bytes: &[u8]| serde_json::to_vec(&sheet_record(marker, bytes)).unwrap();
        let problem = |check: SheetCheck| match check {
            SheetCheck::Wrong(problem) => problem,
            other => panic!("not wrong: {other:?}"),
        };
        let incomplete = |check: SheetCheck| match check {
            SheetCheck::Incomplete(problem) => problem,
            other => panic!("not incomplete: {other:?}"),
        };
        assert_eq!(check_sheet(&job_dir, &m).await.unwrap(), SheetCheck::Absent);
        let sheet = b"sheet of n01".to_vec();
        put(&sheet_key, sheet.clone()).await;
        put(&record_key, record_of(&m, &sheet)).await;
        let SheetCheck::Found(found) = check_sheet(&job_dir, &m).await.unwrap() else { panic!() };
        assert_eq!(found.record.unwrap().attempt_id, "a");
        assert_eq!(&found.bytes[..], &sheet[..]);
        // Same size, other bytes: only the sha256 tells.
        put(&sheet_key, b"sheet of n02".to_vec()).await;
        let changed = problem(check_sheet(&job_dir, &m).await.unwrap());
        assert_eq!(changed.file, "contact_sheets/n01.png");
        assert!(changed.problem.contains("changed since they were written"), "{changed:?}");
        // Another size.
        put(&sheet_key, b"a longer sheet".to_vec()).await;
        let changed = problem(check_sheet(&job_dir, &m).await.unwrap());
        assert!(changed.problem.contains("14 bytes") && changed.problem.contains("(12 bytes)"), "{changed:?}");
        // Another class's sheet and record, copied over this one's.
        let mut other = marker("a", "fp");
        other.wnid = "n02".into();
        put(&sheet_key, sheet.clone()).await;
        put(&record_key, record_of(&other, &sheet)).await;
        let swapped = problem(check_sheet(&job_dir, &m).await.unwrap());
        assert!(swapped.problem.contains("contact sheet of class `n02`"), "{swapped:?}");
        // An earlier attempt's (the class was distilled again, its old sheet left).
        put(&record_key, record_of(&marker("old", "fp"), &sheet)).await;
        let stale = problem(check_sheet(&job_dir, &m).await.unwrap());
        assert!(stale.problem.contains("attempt `old`, not by `a`"), "{stale:?}");
        // A record that does not parse, then none: a marker that promises one finds it missing,
        // an earlier version's marker (no records then) shows its sheet unchecked.
        put(&record_key, b"{".to_vec()).await;
        let unreadable = problem(check_sheet(&job_dir, &m).await.unwrap());
        assert_eq!(
            (unreadable.file.as_str(), unreadable.problem.starts_with("unreadable")),
            ("contact_sheets/n01.json", true)
        );
        out.store.delete(&record_key).await.unwrap();
        let unrecorded = incomplete(check_sheet(&job_dir, &m).await.unwrap());
        assert!(unrecorded.problem.contains("has no record"), "{unrecorded:?}");
        let earlier = marker("a", "fp");
        let SheetCheck::Found(found) = check_sheet(&job_dir, &earlier).await.unwrap() else { panic!() };
        assert!(found.record.is_none());
        // A record without its sheet; an empty sheet is read, not an error.
        put(&record_key, record_of(&m, &sheet)).await;
        out.store.delete(&sheet_key).await.unwrap();
        let orphan = incomplete(check_sheet(&job_dir, &m).await.unwrap());
        assert!(orphan.problem.contains("records a contact sheet that is not there"), "{orphan:?}");
        put(&sheet_key, Vec::new()).await;
        let empty = problem(check_sheet(&job_dir, &m).await.unwrap());
        assert!(empty.problem.contains("0 bytes"), "{empty:?}");
        // A record whose digest is not written as mgd3 writes it (upper case, no prefix) is named
        // as such, not as a sheet changed since.
        put(&sheet_key, sheet.clone()).await;
        let mut record = sheet_record(&m, &sheet);
        record.sha256 = record.sha256.to_uppercase();
        put(&record_key, serde_json::to_vec(&record).unwrap()).await;
        let edited = problem(check_sheet(&job_dir, &m).await.unwrap());
        assert!(edited.file.ends_with(".json") && edited.problem.contains("64 lowercase hex"), "{edited:?}");
        // verify_class: a sheet promised and gone is a note, not a problem; one there is a file.
        put(&record_key, record_of(&m, &sheet)).await;
        assert!(!verify_class(&out, &keys, &m).await.unwrap().2);
        remove_sheet(&out, &keys, "n01").await.unwrap();
        let (_, problems, missing) = verify_class(&out, &keys, &m).await.unwrap();
        assert!(missing && !problems.iter().any(|p| p.file.contains("contact_sheets")), "{problems:?}");
        assert!(!verify_class(&out, &keys, &marker("a", "fp")).await.unwrap().2, "an earlier version promised none");
        // Removed, record first; uncommitting the class removes its sheet too.
        remove_sheet(&out, &keys, "n01").await.unwrap();
        assert_eq!(check_sheet(&job_dir, &m).await.unwrap(), SheetCheck::Absent);
        put(&sheet_key, sheet.clone()).await;
        put(&record_key, record_of(&m, &sheet)).await;
        uncommit(&out, &keys, "n01").await.unwrap();
        assert_eq!(check_sheet(&job_dir, &m).await.unwrap(), SheetCheck::Absent);
    }
}
