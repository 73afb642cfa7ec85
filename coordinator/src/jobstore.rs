//! The state seam: where the coordinator keeps each job's own records, behind the [`JobStore`]
//! trait. [`ObjectJobStore`] keeps them in any object store (`file://`, `memory://`, `s3://`,
//! ...) as `jobs/<id>/job.json` (the resolved job, immutable, create-only), `jobs/<id>/state.json`
//! (the job-level state: cancelled, paused, exclusions, finish, shard count) and one record per
//! shard, `jobs/<id>/state/shards/<i>.json` (attempts, last error, lease). Outputs, commit
//! markers and manifests are not job records: they live in the job's output store
//! (see [`crate::state`]).
//!
//! Per-shard records keep the cost of persisting an event independent of the job's size: a
//! flush writes only the shards that changed since the last write (a lease's renewed deadline
//! alone is no change: recovery gives every lease a fresh period anyway), where one `state.json`
//! with every shard was rewritten whole — 770 KB per flush at ImageNet-21K's 5,461 shards, 55 KB
//! per committed class (measured by the `simulate` binary). A shard never leased has no record.
//!
//! `state.json` carries a `schema_version` ([`STATE_SCHEMA_VERSION`]). Files from before it
//! existed have the shape of version 1 and are read as such; versions 1 and 2 hold every shard
//! in `state.json` and are read with any records written since laid over them (the first write
//! of this version moves them out); a file from a newer mgd3 is refused ([`Error::StateTooNew`]),
//! which quarantines the job rather than losing what it records.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use mgd3_common::job::ResolvedJob;
use mgd3_common::layout::JobKeys;
use mgd3_common::store::{Location, get_optional, put_create, retry_idempotent};
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::scheduler::{PersistedJob, Shard, ShardState};

/// The `schema_version` this build writes into `state.json`, and the newest it reads.
/// 1: the unversioned files written before the field existed (same shape).
/// 2: `schema_version` added; shards record `classes_done`.
/// 3: shards moved to per-shard records (`state/shards/<i>.json`); `shard_count` added.
pub const STATE_SCHEMA_VERSION: u32 = 3;

/// Shard records read or written at once.
const RECORD_CONCURRENCY: usize = 32;

/// A job's records as loaded: the resolved job and its persisted state, if any.
pub type JobRecords = (ResolvedJob, Option<PersistedJob>);

/// Every job folder's id with its records, or what is wrong with them.
pub type LoadedJobs = Vec<(String, Result<JobRecords>)>;

/// Where the coordinator keeps job records. Implementations are safe to call concurrently for
/// different jobs; the coordinator never writes one job's state from two tasks at once.
///
/// Every method's errors keep the store URL and the key: [`Error::ObjectStore`] for a store that
/// cannot be reached or refuses, [`Error::Corrupt`] / [`Error::Missing`] /
/// [`Error::StateTooNew`] for records that exist but cannot be used (the job is quarantined).
pub trait JobStore: Send + Sync {
    /// The store's URL as the user gave it, for messages.
    fn url(&self) -> &str;

    /// Writes `job.json` create-only. `Ok(true)` when it was created, `Ok(false)` when the same
    /// job (same fingerprint) was already there.
    ///
    /// # Errors
    /// [`Error::JobIdTaken`] when the id holds a job of another fingerprint.
    fn create_job<'a>(&'a self, job: &'a ResolvedJob) -> BoxFuture<'a, Result<bool>>;

    /// Replaces `job.json` with `job`: the rebuild of a job whose `job.json` is missing or
    /// corrupt, once the same spec was submitted again. Removes a `forgotten.json`.
    fn rewrite_job<'a>(&'a self, job: &'a ResolvedJob) -> BoxFuture<'a, Result<()>>;

    /// True when `job.json` of `job_id` exists (readable or not).
    fn job_present<'a>(&'a self, job_id: &'a str) -> BoxFuture<'a, Result<bool>>;

    /// What a job folder without a usable `job.json` holds besides its records.
    fn folder<'a>(&'a self, job_id: &'a str) -> BoxFuture<'a, Result<Folder>>;

    /// Removes what a folder of [`Folder::Temporaries`] holds (the temporary files of writes that
    /// never finished) and the folder itself where the store has folders.
    fn sweep_folder<'a>(&'a self, job_id: &'a str) -> BoxFuture<'a, Result<()>>;

    /// Deletes the job's records (`job.json`, `state.json`); where anything else stays in the
    /// folder (outputs in the same store), or `outputs_elsewhere` (the job's output is another
    /// location, where its outputs stay), writes `forgotten.json` so that the folder is not taken
    /// for a damaged job and the job is said to be forgotten, not unknown, with `output` (the
    /// job's output root, when known) so that what is said can name the folder its outputs are
    /// in. Returns whether outputs stayed.
    fn forget_job<'a>(
        &'a self,
        job_id: &'a str,
        outputs_elsewhere: bool,
        output: Option<&'a str>,
    ) -> BoxFuture<'a, Result<bool>>;

    /// The output root a forgotten job's `forgotten.json` records (`None`: none recorded, or no
    /// such note; an older mgd3 wrote none).
    fn forgotten_output<'a>(&'a self, job_id: &'a str) -> BoxFuture<'a, Option<String>>;

    /// Reads `job.json`.
    ///
    /// # Errors
    /// [`Error::UnknownJob`] when there is none; [`Error::Corrupt`] when it cannot be parsed.
    fn read_job<'a>(&'a self, job_id: &'a str) -> BoxFuture<'a, Result<ResolvedJob>>;

    /// Replaces `state.json` with `state` (stamped with [`STATE_SCHEMA_VERSION`]).
    fn write_state<'a>(&'a self, job_id: &'a str, state: &'a PersistedJob) -> BoxFuture<'a, Result<()>>;

    /// Reads `state.json`: `None` when there is none, or when it is torn or unreadable (markers
    /// still say what is done; only attempt counts are lost, and a warning says so).
    ///
    /// # Errors
    /// [`Error::StateTooNew`] when a newer mgd3 wrote it.
    fn read_state<'a>(&'a self, job_id: &'a str) -> BoxFuture<'a, Result<Option<PersistedJob>>>;

    /// The ids of every job folder, whether or not its records are readable.
    fn job_ids(&self) -> BoxFuture<'_, Result<Vec<String>>>;

    /// One job's records: `job.json` is required ([`Error::Missing`] without it, [`Error::Corrupt`]
    /// when unreadable or about another job). A folder without `job.json` that holds only
    /// temporaries or was forgotten is [`Error::UnknownJob`]: no job.
    fn load_job<'a>(&'a self, job_id: &'a str) -> BoxFuture<'a, Result<JobRecords>> {
        Box::pin(async move {
            let job = match self.read_job(job_id).await {
                Err(Error::UnknownJob(_)) => {
                    return Err(match self.folder(job_id).await? {
                        Folder::Temporaries | Folder::Forgotten => Error::UnknownJob(job_id.into()),
                        Folder::Records => {
                            Error::Missing { path: format!("{}/{}", self.url(), JobKeys::new(job_id).job_json()) }
                        }
                    });
                }
                other => other?,
            };
            if job.job_id != job_id {
                return Err(Error::Corrupt {
                    path: format!("{}/{}", self.url(), JobKeys::new(job_id).job_json()),
                    problem: format!("it describes job `{}`", job.job_id),
                });
            }
            Ok((job, self.read_state(job_id).await?))
        })
    }

    /// Every job, oldest first, each with its records or what is wrong with them (a folder
    /// without `job.json` is reported, not skipped). Fails only when the store cannot be listed
    /// or read.
    fn load_jobs(&self) -> BoxFuture<'_, Result<LoadedJobs>> {
        Box::pin(async move {
            let mut jobs = Vec::new();
            for job_id in self.job_ids().await? {
                let loaded = match self.load_job(&job_id).await {
                    // What a submit killed before job.json was in place left behind: no job.
                    Err(Error::UnknownJob(_)) => {
                        if self.folder(&job_id).await? == Folder::Temporaries {
                            tracing::info!(job = %job_id, "removing the temporary files of a submit that never finished");
                            self.sweep_folder(&job_id).await?;
                        }
                        continue;
                    }
                    Err(error) if !error.is_damage() => return Err(error),
                    loaded => loaded,
                };
                jobs.push((job_id, loaded));
            }
            jobs.sort_by_key(|(id, loaded)| {
                (loaded.as_ref().map(|(job, _)| job.created_unix_ms).unwrap_or(u64::MAX), id.clone())
            });
            Ok(jobs)
        })
    }
}

/// What a job folder without a usable `job.json` holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Folder {
    /// Nothing but temporary files of writes that never finished (a local store's `name#N`), or
    /// nothing at all: a submit killed before `job.json` was in place, or a folder removed by
    /// hand. Not a job.
    Temporaries,
    /// `coordinator forget` removed the records and left the outputs: not a job until the same
    /// spec is submitted again.
    Forgotten,
    /// Records or outputs without `job.json`: a job whose `job.json` was lost (quarantined until
    /// the same spec is submitted again).
    Records,
}

/// `state.json` on disk: the scheduler's persisted job with the schema version beside it.
#[derive(Serialize)]
struct StateFileOut<'a> {
    schema_version: u32,
    #[serde(flatten)]
    state: &'a PersistedJob,
}

#[derive(Deserialize)]
struct StateFileIn {
    /// Absent in files written before versioning: version 1.
    #[serde(default = "legacy_version")]
    schema_version: u32,
    /// Since version 3: the job's shards (their records are beside the file).
    #[serde(default)]
    shard_count: Option<usize>,
    #[serde(flatten)]
    state: PersistedJob,
}

/// `state.json` since version 3: the job-level fields; the shards are in their own records.
#[derive(Serialize)]
struct StateHeadOut<'a> {
    schema_version: u32,
    shard_count: usize,
    cancelled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    paused: Option<&'a str>,
    finished_unix_ms: Option<u64>,
    excluded_workers: &'a BTreeSet<String>,
    #[serde(skip_serializing_if = "no_reasons")]
    exclusion_reasons: &'a BTreeMap<String, String>,
    #[serde(skip_serializing_if = "str::is_empty")]
    fingerprint: &'a str,
}

fn no_reasons(reasons: &&BTreeMap<String, String>) -> bool {
    reasons.is_empty()
}

fn legacy_version() -> u32 {
    1
}

/// Parses `state.json` bytes. `Ok(None)` for a torn or unreadable file.
///
/// # Errors
/// [`Error::StateTooNew`] when its `schema_version` is newer than [`STATE_SCHEMA_VERSION`].
pub fn parse_state(path: &str, bytes: &[u8]) -> Result<Option<PersistedJob>> {
    // The version first, on its own: a newer file may not parse as this build's state at all,
    // and must be refused as newer rather than ignored as torn.
    #[derive(Deserialize)]
    struct Version {
        #[serde(default = "legacy_version")]
        schema_version: u32,
    }
    if let Ok(Version { schema_version }) = serde_json::from_slice::<Version>(bytes)
        && schema_version > STATE_SCHEMA_VERSION
    {
        return Err(Error::StateTooNew {
            path: path.to_owned(),
            found: schema_version,
            supported: STATE_SCHEMA_VERSION,
        });
    }
    match serde_json::from_slice::<StateFileIn>(bytes) {
        Ok(mut file) => {
            debug_assert!(file.schema_version <= STATE_SCHEMA_VERSION);
            if let Some(count) = file.shard_count {
                file.state.shards = vec![Shard::pending(); count];
            }
            Ok(Some(file.state))
        }
        Err(error) => {
            tracing::warn!(%path, %error, "ignoring unreadable state file: attempt counts start again (commit markers still say what is done)");
            Ok(None)
        }
    }
}

/// The bytes of `state.json` for `state` as versions 1 and 2 wrote it, every shard inside (for
/// tests of reading older files).
pub fn state_bytes_v2(state: &PersistedJob) -> Vec<u8> {
    serde_json::to_vec(&StateFileOut { schema_version: 2, state }).expect("serialisable state")
}

/// The bytes of `state.json` for `state`: the job-level fields and the shard count (the shards
/// are written as records, [`shard_record_bytes`]).
pub fn state_bytes(state: &PersistedJob) -> Vec<u8> {
    let head = StateHeadOut {
        schema_version: STATE_SCHEMA_VERSION,
        shard_count: state.shards.len(),
        cancelled: state.cancelled,
        paused: state.paused.as_deref(),
        finished_unix_ms: state.finished_unix_ms,
        excluded_workers: &state.excluded_workers,
        exclusion_reasons: &state.exclusion_reasons,
        fingerprint: &state.fingerprint,
    };
    serde_json::to_vec(&head).expect("serialisable state")
}

/// The bytes of one shard's record.
pub fn shard_record_bytes(shard: &Shard) -> Vec<u8> {
    serde_json::to_vec(shard).expect("serialisable shard")
}

/// Whether two versions of a shard make the same record: equal but for a lease's deadline, which
/// every renewal moves and recovery replaces with a full lease period.
fn same_record(a: &Shard, b: &Shard) -> bool {
    match (&a.state, &b.state) {
        (
            ShardState::Leased { lease_id, attempt_id, worker_id, started_ms, .. },
            ShardState::Leased { lease_id: l, attempt_id: t, worker_id: w, started_ms: s, .. },
        ) => {
            (lease_id, attempt_id, worker_id, started_ms) == (l, t, w, s)
                && (a.attempts, &a.last_error, a.images_done, a.classes_done, &a.before_resume)
                    == (b.attempts, &b.last_error, b.images_done, b.classes_done, &b.before_resume)
        }
        _ => a == b,
    }
}

/// Reads a job's state from the folder `dir` that holds its `state.json` (`state_key`) and its
/// shard records (under `records`), all keys relative to `dir`: `state.json` with every record
/// laid over its shards. `Ok(None)` when there is no `state.json`, or it is torn or unreadable
/// (a warning says so). Also returns each shard as its record has it (a shard without a record:
/// never leased), which is what a later write compares with.
///
/// # Errors
/// [`Error::StateTooNew`] for a `state.json` of a newer mgd3; [`Error::ObjectStore`] when the
/// store cannot be read.
pub async fn read_state_in(
    dir: &Location,
    state_key: &str,
    records: &str,
) -> Result<Option<(PersistedJob, Vec<Shard>)>> {
    let key = dir.key(state_key);
    let err = |context: String| {
        let url = dir.url.clone();
        move |source| Error::ObjectStore { url, context, source }
    };
    let Some(bytes) = get_optional(dir.store.as_ref(), &key).await.map_err(err(format!("reading `{key}`")))? else {
        return Ok(None);
    };
    let Some(mut state) = parse_state(key.as_ref(), &bytes)? else {
        return Ok(None);
    };
    let mut stored = vec![Shard::pending(); state.shards.len()];
    let prefix = dir.key(records);
    let listed: Vec<_> = retry_idempotent(|| dir.store.list(Some(&prefix)).try_collect::<Vec<_>>())
        .await
        .map_err(err(format!("listing `{prefix}`")))?;
    let reads = listed.into_iter().filter_map(|meta| {
        let index = meta.location.filename()?.strip_suffix(".json")?.parse::<usize>().ok()?;
        let store = dir.store.clone();
        Some(async move {
            let read = retry_idempotent(|| async { store.get(&meta.location).await?.bytes().await }).await;
            (index, meta.location, read)
        })
    });
    let mut reads = futures::stream::iter(reads).buffer_unordered(RECORD_CONCURRENCY);
    while let Some((index, location, read)) = reads.next().await {
        let bytes = match read {
            Ok(bytes) => bytes,
            // Deleted between the listing and the read (a `forget` racing a status): no record.
            Err(object_store::Error::NotFound { .. }) => continue,
            Err(source) => return Err(err(format!("reading `{location}`"))(source)),
        };
        match (serde_json::from_slice::<Shard>(&bytes), state.shards.get_mut(index)) {
            (Ok(shard), Some(slot)) => {
                *slot = shard.clone();
                stored[index] = shard;
            }
            (Ok(_), None) => {
                tracing::warn!(path = %location, shards = state.shards.len(), "ignoring the state record of a shard the job does not have");
            }
            (Err(error), _) => {
                tracing::warn!(path = %location, %error, "ignoring an unreadable shard record: its attempt count starts again (commit markers still say what is done)");
            }
        }
    }
    Ok(Some((state, stored)))
}

/// What the store holds of one job's state, as this process last read or wrote it: what the
/// next write compares with, so that it writes only what changed.
#[derive(Debug, Default)]
struct Written {
    /// The bytes of `state.json`.
    head: Vec<u8>,
    /// Each shard as its record has it (`Shard::pending()` where there is none); `None` where
    /// unknown (a record found by a listing, not read): written next time whatever it holds.
    shards: Vec<Option<Shard>>,
}

/// [`JobStore`] over an object store location.
#[derive(Clone, Debug)]
pub struct ObjectJobStore {
    location: Location,
    written: Arc<Mutex<HashMap<String, Written>>>,
}

impl ObjectJobStore {
    /// Job records under `location` (`<location>/jobs/<id>/...`).
    pub fn new(location: Location) -> Self {
        ObjectJobStore { location, written: Arc::default() }
    }

    /// What the store holds of a job's shard records when this process has not read or written
    /// them: one listing; a shard with a record is unknown, one without is never leased.
    async fn stored_shards(&self, job_id: &str, count: usize) -> Result<Vec<Option<Shard>>> {
        let prefix = self.location.key(&JobKeys::new(job_id).shard_records());
        let listed: Vec<_> = retry_idempotent(|| self.location.store.list(Some(&prefix)).try_collect::<Vec<_>>())
            .await
            .map_err(self.store_err(format!("listing `{prefix}`")))?;
        let mut shards = vec![Some(Shard::pending()); count];
        for meta in listed {
            let index = meta.location.filename().and_then(|f| f.strip_suffix(".json")?.parse::<usize>().ok());
            if let Some(slot) = index.and_then(|i| shards.get_mut(i)) {
                *slot = None;
            }
        }
        Ok(shards)
    }

    /// The location the records live in.
    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Deletes `forgotten.json` (absent is fine).
    async fn remove_tombstone(&self, keys: &JobKeys) -> Result<()> {
        let key = self.location.key(&keys.forgotten_json());
        match retry_idempotent(|| self.location.store.delete(&key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(self.store_err(format!("deleting `{key}`"))(source)),
        }
    }

    fn store_err(&self, context: String) -> impl FnOnce(object_store::Error) -> Error + use<> {
        let url = self.location.url.clone();
        move |source| Error::ObjectStore { url, context, source }
    }
}

impl JobStore for ObjectJobStore {
    fn url(&self) -> &str {
        &self.location.url
    }

    fn create_job<'a>(&'a self, job: &'a ResolvedJob) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let key = self.location.key(&JobKeys::new(&job.job_id).job_json());
            let bytes = serde_json::to_vec_pretty(job).expect("serialisable job");
            if put_create(self.location.store.as_ref(), &key, bytes)
                .await
                .map_err(self.store_err(format!("writing `{key}`")))?
            {
                // The spec of a forgotten job submitted again: the folder is a job again.
                self.remove_tombstone(&JobKeys::new(&job.job_id)).await?;
                return Ok(true);
            }
            let existing = self.read_job(&job.job_id).await?;
            if existing.fingerprint != job.fingerprint {
                return Err(Error::JobIdTaken { job: job.job_id.clone() });
            }
            Ok(false)
        })
    }

    fn rewrite_job<'a>(&'a self, job: &'a ResolvedJob) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let keys = JobKeys::new(&job.job_id);
            let key = self.location.key(&keys.job_json());
            let bytes = serde_json::to_vec_pretty(job).expect("serialisable job");
            retry_idempotent(|| self.location.store.put(&key, PutPayload::from(bytes.clone())))
                .await
                .map_err(self.store_err(format!("writing `{key}`")))?;
            self.remove_tombstone(&keys).await
        })
    }

    fn job_present<'a>(&'a self, job_id: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let key = self.location.key(&JobKeys::new(job_id).job_json());
            match retry_idempotent(|| self.location.store.head(&key)).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(source) => Err(self.store_err(format!("reading `{key}`"))(source)),
            }
        })
    }

    fn folder<'a>(&'a self, job_id: &'a str) -> BoxFuture<'a, Result<Folder>> {
        Box::pin(async move {
            let keys = JobKeys::new(job_id);
            let prefix = self.location.key(keys.root());
            // A local store lists no `name#N` temporaries: a folder of only those lists empty.
            let objects: Vec<_> = retry_idempotent(|| self.location.store.list(Some(&prefix)).try_collect::<Vec<_>>())
                .await
                .map_err(self.store_err(format!("listing `{prefix}`")))?;
            let tombstone = self.location.key(&keys.forgotten_json());
            Ok(if objects.is_empty() {
                Folder::Temporaries
            } else if objects.iter().any(|o| o.location == tombstone) {
                Folder::Forgotten
            } else {
                Folder::Records
            })
        })
    }

    fn sweep_folder<'a>(&'a self, job_id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let keys = JobKeys::new(job_id);
            if let Some(folder) = self.location.local_path(keys.root()) {
                // Only temporaries and empty folders are left (the listing found no object).
                match std::fs::remove_dir_all(&folder) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => {
                        return Err(Error::Io { what: "job folder", path: folder.display().to_string(), source });
                    }
                }
            }
            Ok(())
        })
    }

    fn forgotten_output<'a>(&'a self, job_id: &'a str) -> BoxFuture<'a, Option<String>> {
        Box::pin(async move {
            let key = self.location.key(&JobKeys::new(job_id).forgotten_json());
            let bytes = get_optional(self.location.store.as_ref(), &key).await.ok()??;
            let note: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
            note.get("output").and_then(|o| o.as_str()).map(str::to_owned)
        })
    }

    fn forget_job<'a>(
        &'a self,
        job_id: &'a str,
        outputs_elsewhere: bool,
        output: Option<&'a str>,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let keys = JobKeys::new(job_id);
            let prefix = self.location.key(keys.root());
            let records = [keys.job_json(), keys.state_json(), keys.forgotten_json()].map(|k| self.location.key(&k));
            let shard_records = self.location.key(&keys.shard_records());
            let objects: Vec<_> = retry_idempotent(|| self.location.store.list(Some(&prefix)).try_collect::<Vec<_>>())
                .await
                .map_err(self.store_err(format!("listing `{prefix}`")))?;
            // A coordinator's claim on the job's output (given up in the background as the job
            // ended) is no output either.
            let claim = self.location.key(&keys.claim());
            let is_record = |o: &object_store::ObjectMeta| {
                records.contains(&o.location) || o.location == claim || o.location.prefix_matches(&shard_records)
            };
            let outputs_stay = outputs_elsewhere || objects.iter().any(|o| !is_record(o));
            // The note goes in before the records go out: a crash in between leaves either a
            // job that loads (job.json still there) or a forgotten one, never a damaged one.
            if outputs_stay {
                let key = &records[2];
                let mut note = serde_json::json!({ "job_id": job_id, "forgotten_unix_ms": mgd3_common::now_ms() });
                if let Some(output) = output {
                    note["output"] = output.into();
                }
                let bytes = serde_json::to_vec_pretty(&note).expect("serialisable note");
                retry_idempotent(|| self.location.store.put(key, PutPayload::from(bytes.clone())))
                    .await
                    .map_err(self.store_err(format!("writing `{key}`")))?;
            }
            // The shard records first: a crash part-way leaves a job that loads, with fewer
            // attempt counts, rather than records without their job.
            let shard_keys = objects.iter().filter(|o| o.location.prefix_matches(&shard_records)).map(|o| &o.location);
            for key in shard_keys.chain(&records[..2]) {
                match retry_idempotent(|| self.location.store.delete(key)).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(source) => return Err(self.store_err(format!("deleting `{key}`"))(source)),
                }
            }
            self.written.lock().expect("written").remove(job_id);
            if !outputs_stay {
                self.remove_tombstone(&keys).await?;
                self.sweep_folder(job_id).await?;
            }
            Ok(outputs_stay)
        })
    }

    fn read_job<'a>(&'a self, job_id: &'a str) -> BoxFuture<'a, Result<ResolvedJob>> {
        Box::pin(async move {
            let key = self.location.key(&JobKeys::new(job_id).job_json());
            let bytes = get_optional(self.location.store.as_ref(), &key)
                .await
                .map_err(self.store_err(format!("reading `{key}`")))?
                .ok_or_else(|| Error::UnknownJob(job_id.into()))?;
            serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt { path: key.to_string(), problem: e.to_string() })
        })
    }

    fn write_state<'a>(&'a self, job_id: &'a str, state: &'a PersistedJob) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let keys = JobKeys::new(job_id);
            let known = self.written.lock().expect("written").remove(job_id);
            let mut written = match known {
                Some(written) if written.shards.len() == state.shards.len() => written,
                _ => Written { head: Vec::new(), shards: self.stored_shards(job_id, state.shards.len()).await? },
            };
            // The shards that changed, then the job-level file: a record is a fact about its
            // shard alone, so any order is safe; a failed write is retried by the next flush.
            let changed: Vec<usize> = (0..state.shards.len())
                .filter(|&i| !written.shards[i].as_ref().is_some_and(|w| same_record(w, &state.shards[i])))
                .collect();
            let writes = changed.into_iter().map(|i| {
                let key = self.location.key(&keys.shard_record(i));
                let bytes = shard_record_bytes(&state.shards[i]);
                async move {
                    let result = retry_idempotent(|| self.location.store.put(&key, PutPayload::from(bytes.clone())))
                        .await
                        .map_err(self.store_err(format!("writing `{key}`")));
                    (i, result)
                }
            });
            let mut writes = futures::stream::iter(writes).buffer_unordered(RECORD_CONCURRENCY);
            let mut failed = None;
            while let Some((i, result)) = writes.next().await {
                match result {
                    Ok(_) => written.shards[i] = Some(state.shards[i].clone()),
                    Err(error) => failed = failed.or(Some(error)),
                }
            }
            drop(writes);
            let head = state_bytes(state);
            if failed.is_none() && written.head != head {
                let key = self.location.key(&keys.state_json());
                match self.location.store.put(&key, PutPayload::from(head.clone())).await {
                    Ok(_) => written.head = head,
                    Err(source) => failed = Some(self.store_err(format!("writing `{key}`"))(source)),
                }
            }
            self.written.lock().expect("written").insert(job_id.to_owned(), written);
            failed.map_or(Ok(()), Err)
        })
    }

    fn read_state<'a>(&'a self, job_id: &'a str) -> BoxFuture<'a, Result<Option<PersistedJob>>> {
        Box::pin(async move {
            let keys = JobKeys::new(job_id);
            let Some((state, stored)) =
                read_state_in(&self.location, &keys.state_json(), &keys.shard_records()).await?
            else {
                return Ok(None);
            };
            // The shards as their records have them; `state.json` is rewritten on the next write
            // (one small file; a file of an earlier version, its shards inside, must be anyway).
            let head = Vec::new();
            let written = Written { head, shards: stored.into_iter().map(Some).collect() };
            self.written.lock().expect("written").insert(job_id.to_owned(), written);
            Ok(Some(state))
        })
    }

    fn job_ids(&self) -> BoxFuture<'_, Result<Vec<String>>> {
        Box::pin(async move {
            let prefix = self.location.key(JobKeys::JOBS);
            let listing = self
                .location
                .store
                .list_with_delimiter(Some(&prefix))
                .await
                .map_err(self.store_err(format!("listing `{prefix}`")))?;
            Ok(listing.common_prefixes.iter().filter_map(|dir| dir.filename().map(str::to_owned)).collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_files_from_before_versioning_are_read_and_newer_ones_refused() {
        let legacy = br#"{"shards":[{"state":{"state":"pending"},"attempts":2,"last_error":null,"images_done":0}],"cancelled":false,"finished_unix_ms":null,"excluded_workers":["w9"]}"#;
        let state = parse_state("jobs/j/state.json", legacy).unwrap().unwrap();
        assert_eq!((state.shards[0].attempts, state.excluded_workers.len()), (2, 1));
        // What this build writes carries its version and reads back the same.
        let bytes = state_bytes(&state);
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(value["schema_version"], STATE_SCHEMA_VERSION);
        // The shards are not in the file since version 3 (they are records of their own): it
        // reads back with as many never-leased shards, the rest as written.
        let mut without_shards = state.clone();
        without_shards.shards = vec![Shard::pending(); state.shards.len()];
        assert_eq!(parse_state("p", &bytes).unwrap(), Some(without_shards));
        assert_eq!(parse_state("p", &state_bytes_v2(&state)).unwrap(), Some(state));
        // A newer file is refused with the versions and what to do, even when its shape changed.
        let newer = format!(r#"{{"schema_version":{},"jobs":"elsewhere"}}"#, STATE_SCHEMA_VERSION + 1);
        let error = parse_state("jobs/j/state.json", newer.as_bytes()).unwrap_err();
        assert!(error.is_damage());
        let text = error.to_string();
        for part in ["jobs/j/state.json", &format!("schema_version {}", STATE_SCHEMA_VERSION + 1), "newer mgd3"] {
            assert!(text.contains(part), "{text} lacks {part}");
        }
        // A torn file only loses attempt counts.
        assert_eq!(parse_state("p", b"{\"shards\":[{").unwrap(), None);
    }
}
