//! The state seam: where the coordinator keeps each job's own records, behind the [`JobStore`]
//! trait. [`ObjectJobStore`] keeps them in any object store (`file://`, `memory://`, `s3://`,
//! ...) as `jobs/<id>/job.json` (the resolved job, immutable, create-only) and
//! `jobs/<id>/state.json` (attempts, failures, leases and exclusions; rewritten). Outputs, commit
//! markers and manifests are not job records: they live in the job's output store
//! (see [`crate::state`]).
//!
//! `state.json` carries a `schema_version` ([`STATE_SCHEMA_VERSION`]). Files from before it
//! existed have the shape of version 1 and are read as such; a file from a newer mgd3 is refused
//! ([`Error::StateTooNew`]), which quarantines the job rather than losing what it records.

use futures::TryStreamExt;
use futures::future::BoxFuture;
use mgd3_common::job::ResolvedJob;
use mgd3_common::layout::JobKeys;
use mgd3_common::store::{Location, get_optional, put_create, retry_idempotent};
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::scheduler::PersistedJob;

/// The `schema_version` this build writes into `state.json`, and the newest it reads.
/// 1: the unversioned files written before the field existed (same shape).
/// 2: `schema_version` added; shards record `classes_done`.
pub const STATE_SCHEMA_VERSION: u32 = 2;

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
    /// folder (outputs in the same store), writes `forgotten.json` so that the folder is not
    /// taken for a damaged job. Returns whether anything stayed.
    fn forget_job<'a>(&'a self, job_id: &'a str) -> BoxFuture<'a, Result<bool>>;

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
    #[serde(flatten)]
    state: PersistedJob,
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
        Ok(file) => {
            debug_assert!(file.schema_version <= STATE_SCHEMA_VERSION);
            Ok(Some(file.state))
        }
        Err(error) => {
            tracing::warn!(%path, %error, "ignoring unreadable state file: attempt counts start again (commit markers still say what is done)");
            Ok(None)
        }
    }
}

/// The bytes of `state.json` for `state`.
pub fn state_bytes(state: &PersistedJob) -> Vec<u8> {
    serde_json::to_vec(&StateFileOut { schema_version: STATE_SCHEMA_VERSION, state }).expect("serialisable state")
}

/// [`JobStore`] over an object store location.
#[derive(Clone, Debug)]
pub struct ObjectJobStore {
    location: Location,
}

impl ObjectJobStore {
    /// Job records under `location` (`<location>/jobs/<id>/...`).
    pub fn new(location: Location) -> Self {
        ObjectJobStore { location }
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

    fn forget_job<'a>(&'a self, job_id: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let keys = JobKeys::new(job_id);
            let prefix = self.location.key(keys.root());
            let records = [keys.job_json(), keys.state_json(), keys.forgotten_json()].map(|k| self.location.key(&k));
            let objects: Vec<_> = retry_idempotent(|| self.location.store.list(Some(&prefix)).try_collect::<Vec<_>>())
                .await
                .map_err(self.store_err(format!("listing `{prefix}`")))?;
            let outputs_stay = objects.iter().any(|o| !records.contains(&o.location));
            // The note goes in before the records go out: a crash in between leaves either a
            // job that loads (job.json still there) or a forgotten one, never a damaged one.
            if outputs_stay {
                let key = &records[2];
                let note = serde_json::json!({ "job_id": job_id, "forgotten_unix_ms": mgd3_common::now_ms() });
                let bytes = serde_json::to_vec_pretty(&note).expect("serialisable note");
                retry_idempotent(|| self.location.store.put(key, PutPayload::from(bytes.clone())))
                    .await
                    .map_err(self.store_err(format!("writing `{key}`")))?;
            }
            for key in &records[..2] {
                match retry_idempotent(|| self.location.store.delete(key)).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(source) => return Err(self.store_err(format!("deleting `{key}`"))(source)),
                }
            }
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
            let key = self.location.key(&JobKeys::new(job_id).state_json());
            self.location
                .store
                .put(&key, PutPayload::from(state_bytes(state)))
                .await
                .map_err(self.store_err(format!("writing `{key}`")))?;
            Ok(())
        })
    }

    fn read_state<'a>(&'a self, job_id: &'a str) -> BoxFuture<'a, Result<Option<PersistedJob>>> {
        Box::pin(async move {
            let key = self.location.key(&JobKeys::new(job_id).state_json());
            let Some(bytes) = get_optional(self.location.store.as_ref(), &key)
                .await
                .map_err(self.store_err(format!("reading `{key}`")))?
            else {
                return Ok(None);
            };
            parse_state(key.as_ref(), &bytes)
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
        assert_eq!(parse_state("p", &bytes).unwrap(), Some(state));
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
