//! One coordinator per store: a lock object `coordinator.lock` in the store, created
//! create-only, kept alive by a heartbeat, released on a clean shutdown and taken over once its
//! heartbeat is older than the lock timeout (its holder was killed). Two coordinators leasing the
//! same jobs would distil every class twice; the second one waits for a stale lock to expire and
//! refuses a live one, naming its holder.
//!
//! The lock is advisory and needs no conditional overwrite from the store: the holder re-reads
//! it before every heartbeat and stops when another owner's lock is there, so two owners after a
//! racing takeover last at most one heartbeat interval. And a holder that could not renew acts as
//! if it had lost the lock before anyone may take it over ([`StoreLock::held_until`]): a waiting
//! coordinator takes over once the lock went unrenewed for its whole timeout, so the holder stops
//! leasing and writing a margin before that, counted from when it sent its last successful
//! renewal, until a renewal succeeds again (or shows another owner, and it stops for good).
//!
//! Taking the lock rides out a store that does not answer (retried as long as any idempotent
//! call): a coordinator restarted during an outage waits for the store instead of exiting. A
//! create whose answer was lost and that is sent again finds its own record, and takes it.

use std::time::Duration;

use mgd3_common::layout::JobKeys;
use mgd3_common::now_ms;
use mgd3_common::store::{Location, get_optional, put_create, retry_idempotent};
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// The lock object, at the store's root.
pub const LOCK_KEY: &str = "coordinator.lock";

/// Who holds a store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRecord {
    /// Random per coordinator process.
    pub owner: String,
    /// The holder's host name.
    pub host: String,
    /// The holder's process id.
    pub pid: u32,
    /// When the holder last renewed the lock (Unix ms).
    pub heartbeat_unix_ms: u64,
    /// How long without a heartbeat before another coordinator may take over (ms).
    pub timeout_ms: u64,
    /// Renewals so far: a watcher sees the holder alive when this or the heartbeat time
    /// changes, so two renewals within one clock tick (or under a paused test clock) still
    /// count. Absent (0) in older records, whose heartbeat time changes.
    #[serde(default)]
    pub renewals: u64,
    /// Which process table `pid` belongs to: the kernel's boot id and the PID namespace
    /// (`/proc/self/ns/pid`), on Linux. A coordinator on the same host, boot and namespace can
    /// see at once that the holder's process is gone instead of waiting out the timeout. Absent
    /// in older records and elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_table: Option<String>,
    /// The URL the holder serves at, once it listens: where a second `coordinator run` or
    /// `distill.sbatch` on the same store is told to submit instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The token file the holder was started with (a path, never the token): what a client of
    /// `url` passes as `--token-file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
    /// The Slurm job the holder runs in (`SLURM_JOB_ID`), if any: a second allocation on the store
    /// can be queued after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slurm_job: Option<String>,
    /// The holder is a `coordinator run`, which stops once its own job has ended: a job submitted
    /// to it would be left part-done, so a second one is told to wait instead.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exits_when_done: bool,
    /// The URL of the store the holder serves (its own lock and the jobs' state): said to a
    /// coordinator of another store refused a job's output ([`LockError::JobHeld`]). Absent in
    /// older records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// The job a claim on a job's output is for (absent in the store's lock, and in older
    /// claims): a record of another job in a job's claim (copied by hand) claims nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
}

impl LockRecord {
    /// What changes at every renewal: the heartbeat time and the renewal count.
    fn beat(&self) -> (u64, u64) {
        (self.heartbeat_unix_ms, self.renewals)
    }
}

/// How often a waiting coordinator re-reads `holder`'s lock: a tenth of its timeout, 20 ms to 1 s.
fn poll_interval(holder: &LockRecord) -> Duration {
    Duration::from_millis((holder.timeout_ms / 10).clamp(20, 1000))
}

/// This process's [`LockRecord::process_table`]: `<boot id>/<pid namespace>` on Linux.
fn process_table() -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let namespace = std::fs::read_link("/proc/self/ns/pid").ok()?;
    Some(format!("{}/{}", boot.trim(), namespace.display()))
}

/// True when `holder` is a process of this host's process table (same host, boot and PID
/// namespace) that no longer exists: its lock can be taken over without waiting.
fn holder_is_dead_here(holder: &LockRecord, host: &str) -> bool {
    let here = process_table();
    if here.is_none() || holder.process_table != here || holder.host != host {
        return false;
    }
    libc::pid_t::try_from(holder.pid).is_ok() && !crate::runtime::process_exists(holder.pid)
}

/// What a refusal to write the lock means for a person: the store must be writable.
fn refused(source: &object_store::Error) -> String {
    match mgd3_common::store::Refusal::of(source) {
        Some(refusal) => format!(
            " cannot be written ({}): the coordinator keeps its lock and the jobs' state in the store; make it \
             writable, or give another --store",
            refusal_words(refusal)
        ),
        None => String::new(),
    }
}

/// A refusal in a few words.
fn refusal_words(refusal: mgd3_common::store::Refusal) -> &'static str {
    match refusal {
        mgd3_common::store::Refusal::Full => "the disk is full or over quota",
        mgd3_common::store::Refusal::ReadOnly => "a read-only file system",
        mgd3_common::store::Refusal::Denied => "no permission",
    }
}

/// What a refusal to write a claim in a job's output means for a person.
fn refused_output(source: &object_store::Error) -> String {
    mgd3_common::store::Refusal::of(source)
        .map(|refusal| {
            format!(
                " cannot be written ({}): the job's output must be writable; free space or fix its permissions, then \
                 submit or resume the job again",
                refusal_words(refusal)
            )
        })
        .unwrap_or_default()
}

/// Why the store's coordinator lock could not be taken or kept.
#[derive(Debug, Error)]
pub enum LockError {
    /// Another coordinator holds the store and renewed its lock while this one watched it.
    #[error(
        "store `{url}` is served by another coordinator ({}, pid {}, last heartbeat {age_s:.0} s ago){}; \
         or stop it first, or give this coordinator another --store (a coordinator that was killed releases the \
         store {} s after its last heartbeat)",
        holder.host, holder.pid, submit_there(holder), holder.timeout_ms / 1000
    )]
    Held {
        /// The store's URL.
        url: String,
        /// The holder's lock record: who it is, where it serves.
        holder: Box<LockRecord>,
        /// Seconds since the heartbeat time in the holder's lock.
        age_s: f64,
    },
    /// The store could not be read or written.
    #[error("store `{url}`: the coordinator lock `{LOCK_KEY}`{}", refused(source))]
    Store {
        /// The store's URL.
        url: String,
        /// What the store answered.
        #[source]
        source: object_store::Error,
    },
    /// Another coordinator, of another store, runs a job whose output is the same: it renewed
    /// its claim on the output ([`StoreLock::claim`]) while this one watched.
    #[error(
        "job `{job}`: its output `{output}` is being distilled by another coordinator ({}, pid {}, store `{}`, \
         last heartbeat {age_s:.0} s ago){}; or wait for that one to finish the job, or give this job another \
         `output` (a coordinator that was killed gives the job up {} s after its last heartbeat, and at once to the \
         next coordinator of its own store)",
        holder.host, holder.pid, holder.store.as_deref().unwrap_or_default(), submit_there(holder),
        holder.timeout_ms / 1000
    )]
    JobHeld {
        /// The job.
        job: String,
        /// The job's output URL.
        output: String,
        /// The holder's claim record: who it is, its store, where it serves.
        holder: Box<LockRecord>,
        /// Seconds since the heartbeat time in the holder's claim.
        age_s: f64,
    },
    /// The claim on a job's output could not be read or written.
    #[error("job `{job}`: the coordinator's claim on its output `{output}`{}", refused_output(source))]
    ClaimStore {
        /// The job.
        job: String,
        /// The job's output URL.
        output: String,
        /// What the output's store answered.
        #[source]
        source: object_store::Error,
    },
    /// Another coordinator claimed a job's output since this one did (found at a renewal): this
    /// coordinator pauses the job.
    #[error(
        "job `{job}`: another coordinator ({host}, pid {pid}, store `{store}`) took its output `{output}` over; this \
         coordinator paused the job (`coordinator resume {job}` here once that one is done with it)"
    )]
    ClaimLost {
        /// The job.
        job: String,
        /// The job's output URL.
        output: String,
        /// The new holder's store URL.
        store: String,
        /// The new holder's host name.
        host: String,
        /// The new holder's process id.
        pid: u32,
    },
    /// Another coordinator's lock replaced this one's (found at a renewal): this coordinator must stop.
    #[error("store `{url}`: another coordinator ({host}, pid {pid}) took over the store; this one stops")]
    Lost {
        /// The store's URL.
        url: String,
        /// The new holder's host name.
        host: String,
        /// The new holder's process id.
        pid: u32,
    },
}

/// How to submit to the coordinator `holder` names instead of starting another one.
fn submit_there(holder: &LockRecord) -> String {
    let (url, token_file, slurm_job) =
        (holder.url.as_deref(), holder.token_file.as_deref(), holder.slurm_job.as_deref());
    let exits_when_done = holder.exits_when_done;
    let after = slurm_job
        .map(|id| format!("; or queue this allocation after that Slurm job: `sbatch --dependency=afterany:{id} …`"))
        .unwrap_or_default();
    let Some(url) = url else { return after };
    if exits_when_done {
        return format!(
            " at {url}, a `coordinator run` (or the sbatch script's coordinator) that stops once its own job has \
             ended: run this command again after it (`coordinator status` shows how far it is), or give this job \
             another `output`{after}"
        );
    }
    let token = token_file.map(|f| format!(" --token-file {f}")).unwrap_or_default();
    let sbatch_token = token_file.map(|f| format!(" MGD3_TOKEN_FILE={f}")).unwrap_or_default();
    format!(
        " at {url}: submit to it instead, `coordinator submit job.toml --coordinator {url}{token} --wait` \
         (for scripts/slurm/distill.sbatch: `MGD3_COORDINATOR={url}{sbatch_token} sbatch …`){after}"
    )
}

/// A coordinator's claim on one job's output ([`StoreLock::claim`]).
#[derive(Clone, Debug)]
pub struct JobClaim {
    job_id: String,
    out: Location,
    /// Until when (this process's tokio clock) the claim is surely still this coordinator's: the
    /// timeout less a margin after the last write of it that succeeded, as for the store's lock
    /// ([`StoreLock::held_until`]). Past it, another coordinator may have taken the job over.
    held_until: Instant,
}

impl JobClaim {
    /// The job whose output is claimed.
    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// See the field: whether the claim may have lapsed at `now`.
    pub fn lapsed(&self, now: Instant) -> bool {
        now >= self.held_until
    }

    /// Records a renewal that succeeded ([`StoreLock::renew_claim`]'s answer).
    pub fn renewed(&mut self, held_until: Instant) {
        self.held_until = held_until;
    }
}

/// How long a stopping coordinator tries to release its lock.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// A held store lock.
#[derive(Clone, Debug)]
pub struct StoreLock {
    store: Location,
    record: LockRecord,
    /// See [`StoreLock::held_until`].
    held_until: Instant,
    /// The owner whose lock this one took over (it was killed, or stopped renewing): its claims
    /// on job outputs are taken over at once.
    replaced: Option<String>,
}

/// How long before another coordinator may take the lock over its holder stops acting on it:
/// a tenth of the timeout, at least 100 ms (clock rates and the time a call in flight takes).
fn margin(timeout_ms: u64) -> Duration {
    Duration::from_millis((timeout_ms / 10).max(100))
}

impl StoreLock {
    /// Takes the store's lock: at once when it is free, after waiting for a stale one (no
    /// heartbeat for its timeout) to expire. `timeout` is this holder's own lock timeout.
    ///
    /// # Errors
    /// [`LockError::Held`] when another coordinator keeps renewing it; [`LockError::Store`].
    pub async fn acquire(store: &Location, timeout: Duration) -> Result<StoreLock, LockError> {
        let mut record = LockRecord {
            owner: uuid::Uuid::new_v4().simple().to_string(),
            host: hostname::get().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default(),
            pid: std::process::id(),
            heartbeat_unix_ms: now_ms(),
            timeout_ms: timeout.as_millis() as u64,
            renewals: 0,
            process_table: process_table(),
            url: None,
            token_file: None,
            slurm_job: std::env::var("SLURM_JOB_ID").ok().filter(|id| !id.is_empty()),
            exits_when_done: false,
            store: Some(store.url.clone()),
            job: None,
        };
        let key = store.key(LOCK_KEY);
        let err = |source| LockError::Store { url: store.url.clone(), source };
        match take("the store", store, &key, &mut record, |_| false, |_| false).await.map_err(err)? {
            Taken(sent, replaced) => {
                info!(store = %store.url, "coordinator lock taken");
                // Temporaries of lock writes a killed holder left (`coordinator.lock#N`): only
                // the holder writes the lock, and that is this process now.
                if let Err(error) = mgd3_common::commit::remove_staging_copies(store, "", LOCK_KEY, Duration::ZERO) {
                    warn!(store = %store.url, error = %mgd3_common::error_chain(&error), "cannot remove a temporary lock file");
                }
                let held_until = sent + Duration::from_millis(record.timeout_ms) - margin(record.timeout_ms);
                Ok(StoreLock { store: store.clone(), record, held_until, replaced })
            }
            Held(holder, age_s) => Err(LockError::Held { url: store.url.clone(), holder: Box::new(holder), age_s }),
        }
    }

    /// Claims the output of job `job_id` at `out` for this coordinator ([`JobKeys::claim`]): a
    /// coordinator of another store whose job writes to the same output refuses to run it while
    /// this one renews the claim ([`StoreLock::renew_claim`], at the store lock's heartbeat). A
    /// claim already this coordinator's is kept; one whose holder stopped renewing for its timeout
    /// is taken over, at once when its holder served this coordinator's own store (it has lost
    /// that store to this one) or when its last heartbeat is two timeouts old by the wall clock.
    ///
    /// # Errors
    /// [`LockError::JobHeld`] when another coordinator keeps renewing it;
    /// [`LockError::ClaimStore`] when the output cannot be read or written.
    pub async fn claim(&self, out: &Location, job_id: &str) -> Result<JobClaim, LockError> {
        let key = out.key(&JobKeys::new(job_id).claim());
        let mut record = LockRecord { job: Some(job_id.to_owned()), ..self.record.clone() };
        let ours = &self.store.url;
        let local_store = self.store.local_path("").is_some();
        // The holder is the coordinator whose store lock this one took over, or served this very
        // store, which this coordinator holds now: it was replaced. (A local store path names one
        // folder per host unless it is shared: the same host then.)
        let replaced = |holder: &LockRecord| {
            self.replaced.as_deref() == Some(holder.owner.as_str())
                || (holder.store.as_deref() == Some(ours.as_str()) && (!local_store || holder.host == self.record.host))
        };
        let long_gone =
            |holder: &LockRecord| now_ms().saturating_sub(holder.heartbeat_unix_ms) >= 2 * holder.timeout_ms.max(1);
        // Renewed within its heartbeat (a third of its timeout, and a second for the clocks) by
        // this host's wall clock, and not from the future: a live holder, refused without
        // watching it for a heartbeat (a restart with many such jobs, a submit refused). A
        // holder that looks older, or whose clock runs ahead, is watched as the store's lock is.
        let fresh = |holder: &LockRecord| {
            let (now, beat) = (now_ms(), holder.heartbeat_unix_ms);
            beat <= now + 1000 && now.saturating_sub(beat) < holder.timeout_ms / 3 + 1000
        };
        let err = |source| LockError::ClaimStore { job: job_id.to_owned(), output: out.url.clone(), source };
        let other_job = |holder: &LockRecord| holder.job.as_deref().is_some_and(|job| job != job_id);
        match take(
            "the job's output",
            out,
            &key,
            &mut record,
            |holder| other_job(holder) || replaced(holder) || long_gone(holder),
            fresh,
        )
        .await
        .map_err(err)?
        {
            Taken(sent, _) => {
                debug!(job = %job_id, output = %out.url, "job output claimed");
                let held_until = sent + Duration::from_millis(record.timeout_ms) - margin(record.timeout_ms);
                Ok(JobClaim { job_id: job_id.to_owned(), out: out.clone(), held_until })
            }
            Held(holder, age_s) => Err(LockError::JobHeld {
                job: job_id.to_owned(),
                output: out.url.clone(),
                holder: Box::new(holder),
                age_s,
            }),
        }
    }

    /// Renews `claim` with this coordinator's record, after checking it is still this
    /// coordinator's. Returns the claim's new [`JobClaim::renewed`] horizon.
    ///
    /// # Errors
    /// [`LockError::ClaimLost`] when another coordinator claimed the job's output since;
    /// [`LockError::ClaimStore`].
    pub async fn renew_claim(&self, claim: &JobClaim) -> Result<Instant, LockError> {
        let key = claim.out.key(&JobKeys::new(&claim.job_id).claim());
        let err = |source| LockError::ClaimStore { job: claim.job_id.clone(), output: claim.out.url.clone(), source };
        let deadline = Instant::now() + self.heartbeat();
        let late =
            || object_store::Error::Generic { store: "claim", source: "the output did not answer in time".into() };
        let current = tokio::time::timeout_at(deadline, get_optional(claim.out.store.as_ref(), &key))
            .await
            .map_err(|_| err(late()))?
            .map_err(err)?;
        if let Some(holder) = current.as_deref().and_then(|b| serde_json::from_slice::<LockRecord>(b).ok())
            && holder.owner != self.record.owner
            // A claim of another job put here by hand claims nothing: overwritten below.
            && holder.job.as_deref().is_none_or(|job| job == claim.job_id)
        {
            return Err(LockError::ClaimLost {
                job: claim.job_id.clone(),
                output: claim.out.url.clone(),
                store: holder.store.unwrap_or_default(),
                host: holder.host,
                pid: holder.pid,
            });
        }
        let mut record = LockRecord { job: Some(claim.job_id.clone()), ..self.record.clone() };
        record.heartbeat_unix_ms = now_ms();
        let bytes = serde_json::to_vec(&record).expect("serialisable claim");
        let sent = Instant::now();
        tokio::time::timeout_at(deadline, claim.out.store.put(&key, PutPayload::from(bytes)))
            .await
            .map_err(|_| err(late()))?
            .map_err(err)?;
        Ok(sent + Duration::from_millis(record.timeout_ms) - margin(record.timeout_ms))
    }

    /// Gives `claim` up (the job ended, was forgotten, or this coordinator stops), if it is still
    /// this coordinator's; bounded like [`StoreLock::release`]. A claim left behind is taken over
    /// after its timeout, or at once by the next coordinator of this store.
    pub async fn release_claim(&self, claim: &JobClaim) {
        let key = claim.out.key(&JobKeys::new(&claim.job_id).claim());
        let release = async {
            let ours = held_by(&claim.out, &key, &self.record.owner).await;
            if ours && let Err(error) = delete(&claim.out, &key).await {
                warn!(job = %claim.job_id, output = %claim.out.url, error = %mgd3_common::error_chain(&error), "could not give up the claim on the job's output");
            }
        };
        if tokio::time::timeout(RELEASE_TIMEOUT, release).await.is_err() {
            warn!(job = %claim.job_id, output = %claim.out.url, "could not give up the claim on the job's output in time (it does not answer)");
        }
    }

    /// Records where this coordinator serves (and its token file's path, and whether it stops once
    /// its job has ended) in the lock, written at once: a second coordinator on the store is told
    /// to submit there, or to wait for it.
    ///
    /// # Errors
    /// Those of [`StoreLock::renew`].
    pub async fn advertise(
        &mut self,
        url: &str,
        token_file: Option<&std::path::Path>,
        exits_when_done: bool,
    ) -> Result<(), LockError> {
        self.record.url = Some(url.to_owned());
        self.record.exits_when_done = exits_when_done;
        self.record.token_file =
            token_file.map(|f| std::path::absolute(f).unwrap_or(f.to_owned()).display().to_string());
        self.renew().await
    }

    /// The lock's timeout: how long it may go unrenewed before another coordinator takes it.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.record.timeout_ms)
    }

    /// How often [`StoreLock::renew`] should run: a third of the timeout.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis((self.record.timeout_ms / 3).max(50))
    }

    /// Until when (this process's tokio clock) this coordinator may act as the store's holder:
    /// the lock timeout less a tenth of it (at least 100 ms) after it sent the last write of the
    /// lock that succeeded.
    /// No other coordinator takes the lock over before the lock went unrenewed for the timeout
    /// after that write landed, so past this instant the holder may have been replaced, and it
    /// leases and writes nothing until a renewal succeeds again.
    pub fn held_until(&self) -> Instant {
        self.held_until
    }

    /// Renews the heartbeat, after checking the lock is still this coordinator's. A renewal that
    /// cannot finish while the lock is still held ([`StoreLock::held_until`]) is abandoned: a
    /// write that lands later could overwrite a coordinator that took the store over meanwhile.
    ///
    /// # Errors
    /// [`LockError::Lost`] when another coordinator holds it now; [`LockError::Store`], also
    /// for a renewal abandoned so.
    pub async fn renew(&mut self) -> Result<(), LockError> {
        let key = self.store.key(LOCK_KEY);
        let url = self.store.url.clone();
        let err = |source| LockError::Store { url: url.clone(), source };
        let deadline = self.held_until.max(Instant::now() + self.heartbeat());
        let abandoned = || LockError::Store {
            url: url.clone(),
            source: object_store::Error::Generic {
                store: "lock",
                source: "the store did not answer before the lock could have been taken over".into(),
            },
        };
        let current = tokio::time::timeout_at(deadline, get_optional(self.store.store.as_ref(), &key))
            .await
            .map_err(|_| abandoned())?
            .map_err(err)?;
        if let Some(holder) = current.as_deref().and_then(|b| serde_json::from_slice::<LockRecord>(b).ok())
            && holder.owner != self.record.owner
        {
            return Err(LockError::Lost { url: self.store.url.clone(), host: holder.host, pid: holder.pid });
        }
        self.record.heartbeat_unix_ms = now_ms();
        self.record.renewals += 1;
        let bytes = serde_json::to_vec(&self.record).expect("serialisable lock");
        let sent = Instant::now();
        tokio::time::timeout_at(deadline, self.store.store.put(&key, PutPayload::from(bytes)))
            .await
            .map_err(|_| abandoned())?
            .map_err(err)?;
        self.held_until = sent + Duration::from_millis(self.record.timeout_ms) - margin(self.record.timeout_ms);
        Ok(())
    }

    /// Releases the lock (if it is still this coordinator's) on a clean shutdown, so that the
    /// next coordinator starts at once.
    pub async fn release(&self) {
        // Bounded: a store that does not answer must not hold a stopping coordinator for the
        // whole retry time; the lock then expires as a killed holder's does.
        if tokio::time::timeout(RELEASE_TIMEOUT, self.release_now()).await.is_err() {
            warn!(store = %self.store.url, timeout_s = RELEASE_TIMEOUT.as_secs(),
                "could not release the coordinator lock in time (the store does not answer); the next coordinator takes it over after the lock timeout");
        }
    }

    async fn release_now(&self) {
        let key = self.store.key(LOCK_KEY);
        let ours = held_by(&self.store, &key, &self.record.owner).await;
        if ours && let Err(error) = delete(&self.store, &key).await {
            warn!(store = %self.store.url, error = %mgd3_common::error_chain(&error), "could not release the coordinator lock");
        } else if ours {
            info!(store = %self.store.url, "coordinator lock released");
        }
    }
}

/// Whether the record at `key` reads and is `owner`'s (a store that does not answer: no).
async fn held_by(store: &Location, key: &object_store::path::Path, owner: &str) -> bool {
    get_optional(store.store.as_ref(), key)
        .await
        .ok()
        .flatten()
        .and_then(|b| serde_json::from_slice::<LockRecord>(&b).ok())
        .is_some_and(|holder| holder.owner == owner)
}

async fn delete(store: &Location, key: &object_store::path::Path) -> Result<(), object_store::Error> {
    match store.store.delete(key).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(source) => Err(source),
    }
}

/// What [`take`] found.
enum Taking {
    /// The lock is this record's now; the instant its last write was sent, and the owner whose
    /// record it replaced, if any.
    Taken(Instant, Option<String>),
    /// Another holder renewed it while watched: its record, and its heartbeat's age (s).
    Held(LockRecord, f64),
}
use Taking::{Held, Taken};

/// The lock protocol shared by the store's lock and the jobs' output claims: creates `key` with
/// `record` (create-only) when free; else watches the holder's record, taking it over once it
/// went unrenewed for its timeout under this process's eyes, at once when its process on this
/// host is gone, when `take_at_once` says so, or when it cannot be read; and answers
/// [`Taking::Held`] as soon as the holder renews it. Rides out a store that does not answer
/// (retried as any idempotent call).
async fn take(
    what: &str,
    store: &Location,
    key: &object_store::path::Path,
    record: &mut LockRecord,
    take_at_once: impl Fn(&LockRecord) -> bool,
    held_at_once: impl Fn(&LockRecord) -> bool,
) -> Result<Taking, object_store::Error> {
    // The holder seen, its last heartbeat (time and renewal count) and when, by this process's
    // tokio clock, it was first seen: staleness is judged by watching the value, so clocks of
    // other hosts do not matter.
    let mut watching: Option<(String, (u64, u64), Instant)> = None;
    let mut replaced = None;
    loop {
        record.heartbeat_unix_ms = now_ms();
        let bytes = serde_json::to_vec(&*record).expect("serialisable lock");
        let mut sent = Instant::now();
        let created = retry_idempotent(|| {
            sent = Instant::now();
            put_create(store.store.as_ref(), key, bytes.clone())
        })
        .await?;
        if created {
            return Ok(Taken(sent, replaced));
        }
        let Some(bytes) = retry_idempotent(|| get_optional(store.store.as_ref(), key)).await? else {
            continue; // released in between
        };
        let Ok(holder) = serde_json::from_slice::<LockRecord>(&bytes) else {
            warn!(store = %store.url, key = %key, "removing an unreadable coordinator lock");
            delete(store, key).await?;
            continue;
        };
        // A create that reached the store, whose answer was lost, sent again.
        if holder.owner == record.owner {
            return Ok(Taken(sent, replaced));
        }
        let gone = if holder_is_dead_here(&holder, &record.host) {
            Some("whose process on this host is gone")
        } else if take_at_once(&holder) {
            Some("that is gone (its store has another coordinator now, or it has been silent for two lock timeouts)")
        } else {
            None
        };
        if let Some(gone) = gone {
            warn!(store = %store.url, key = %key, host = %holder.host, pid = holder.pid,
                "taking over {what} from a coordinator {gone}");
            delete(store, key).await?;
            replaced = Some(holder.owner);
            watching = None;
            continue;
        }
        if watching.is_none() && held_at_once(&holder) {
            let age = now_ms().saturating_sub(holder.heartbeat_unix_ms);
            return Ok(Held(holder, age as f64 / 1000.0));
        }
        match &watching {
            Some((owner, beat, _)) if *owner == holder.owner && *beat != holder.beat() => {
                // Renewed while this coordinator waited: a live holder.
                let age = now_ms().saturating_sub(holder.heartbeat_unix_ms);
                return Ok(Held(holder, age as f64 / 1000.0));
            }
            Some((owner, _, since))
                if *owner == holder.owner && since.elapsed() >= Duration::from_millis(holder.timeout_ms) =>
            {
                warn!(store = %store.url, key = %key, host = %holder.host, pid = holder.pid,
                    "taking over {what} from a coordinator that stopped renewing its lock");
                delete(store, key).await?;
                replaced = Some(holder.owner.clone());
                watching = None;
                continue;
            }
            Some((owner, _, _)) if *owner == holder.owner => {}
            _ => {
                info!(store = %store.url, key = %key, host = %holder.host, pid = holder.pid, timeout_s = holder.timeout_ms / 1000,
                    "{what} is held by another coordinator; waiting to see whether it is alive");
                watching = Some((holder.owner.clone(), holder.beat(), Instant::now()));
            }
        }
        tokio::time::sleep(poll_interval(&holder)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store that refuses the lock's write says so in a sentence with what to do; a store
    /// that fails otherwise is said as before.
    #[test]
    fn a_store_refusing_the_lock_is_said_with_what_to_do() {
        let error = |errno| LockError::Store {
            url: "/ro".into(),
            source: object_store::Error::Generic {
                store: "LocalFileSystem",
                source: Box::new(std::io::Error::from_raw_os_error(errno)),
            },
        };
        let said = mgd3_common::error_chain(&error(1));
        assert!(
            said.starts_with(
                "store `/ro`: the coordinator lock `coordinator.lock` cannot be written (no permission): "
            ) && said.contains("make it writable, or give another --store"),
            "{said}"
        );
        assert!(error(30).to_string().contains("(a read-only file system)"));
        assert_eq!(error(5).to_string(), "store `/ro`: the coordinator lock `coordinator.lock`");
    }

    /// A refused second coordinator is told where the holder serves: submit to a `serve`, wait
    /// for a `coordinator run` (it stops when its own job ends), or queue after its Slurm job.
    #[test]
    fn a_held_store_says_where_to_go() {
        let held = |exits_when_done, slurm_job: Option<&str>| {
            let holder = LockRecord {
                owner: "o".into(),
                host: "n1".into(),
                pid: 7,
                heartbeat_unix_ms: 0,
                timeout_ms: 30_000,
                renewals: 0,
                process_table: None,
                url: Some("http://n1:50051".into()),
                token_file: Some("/home/u/tok".into()),
                slurm_job: slurm_job.map(str::to_owned),
                exits_when_done,
                store: None,
                job: None,
            };
            LockError::Held { url: "s".into(), holder: Box::new(holder), age_s: 1.0 }.to_string()
        };
        let serve = held(false, Some("123"));
        for part in [
            "submit to it instead",
            "--coordinator http://n1:50051 --token-file /home/u/tok",
            "MGD3_COORDINATOR=http://n1:50051 MGD3_TOKEN_FILE=/home/u/tok",
            "--dependency=afterany:123",
        ] {
            assert!(serve.contains(part), "{serve} lacks {part}");
        }
        let run = held(true, None);
        assert!(run.contains("stops once its own job has ended") && !run.contains("submit to it"), "{run}");
    }

    /// On tokio's paused clock: every bound below is exact virtual time, not a wall-clock guess.
    #[tokio::test(start_paused = true)]
    async fn a_live_lock_is_refused_a_stale_one_taken_over_a_released_one_free() {
        let store = mgd3_common::store::open("memory://lock-test/state").unwrap();
        let timeout = Duration::from_secs(30);
        let mut first = StoreLock::acquire(&store, timeout).await.unwrap();
        let heartbeat = first.heartbeat();
        let poll = poll_interval(&first.record);
        assert_eq!((heartbeat, poll), (Duration::from_secs(10), Duration::from_secs(1)));
        // A second coordinator watches while the first renews every heartbeat, and refuses as
        // soon as it sees a renewal: after the first heartbeat, within one poll. The renewals
        // fall within one wall-clock millisecond here, so only their count tells them apart.
        let renewing = {
            let mut first = first.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(heartbeat).await;
                    first.renew().await.unwrap();
                }
            })
        };
        let started = Instant::now();
        let error = StoreLock::acquire(&store, timeout).await.unwrap_err();
        let waited = started.elapsed();
        assert!(matches!(error, LockError::Held { .. }), "{error}");
        assert!(error.to_string().contains("served by another coordinator"), "{error}");
        assert!(waited >= heartbeat && waited <= heartbeat + poll, "refused after {waited:?}");
        renewing.abort();
        // The first stops renewing (killed): the lock is taken over once it has gone one whole
        // timeout unrenewed under this coordinator's eyes, and not before.
        let started = Instant::now();
        let second = StoreLock::acquire(&store, timeout).await.unwrap();
        let waited = started.elapsed();
        assert!(waited >= timeout && waited <= timeout + poll, "taken over after {waited:?}");
        // The first learns it lost the store at its next renewal.
        assert!(matches!(first.renew().await, Err(LockError::Lost { .. })));
        first.release().await;
        // A clean shutdown frees the store at once.
        second.release().await;
        let started = Instant::now();
        let third = StoreLock::acquire(&store, timeout).await.unwrap();
        assert_eq!(started.elapsed(), Duration::ZERO);
        third.release().await;
    }

    /// A job's output claimed by a coordinator of one store is refused to one of another store:
    /// at once while its heartbeat is fresh by the wall clock, after watching it renew when it
    /// looks older; taken over once it goes unrenewed for its timeout (and the first holder
    /// learns it lost it), taken at once by the next coordinator of the holder's own store, and
    /// free at once when given up. On tokio's paused clock: exact virtual time (the wall clock
    /// does not move, so a record is made to look old by rewriting its heartbeat).
    #[tokio::test(start_paused = true)]
    async fn a_job_output_claim_is_refused_while_renewed_and_taken_over_when_not() {
        let open = |url: &str| mgd3_common::store::open(url).unwrap();
        let (out, a_store, b_store) = (open("memory://claim/out"), open("memory://claim/a"), open("memory://claim/b"));
        let timeout = Duration::from_secs(30);
        let a = StoreLock::acquire(&a_store, timeout).await.unwrap();
        let mut claim = a.claim(&out, "job").await.unwrap();
        a.claim(&out, "job").await.unwrap(); // its own: kept
        let (heartbeat, poll) = (a.heartbeat(), poll_interval(&a.record));
        // Surely its own until the timeout less a tenth, from the last write that worked.
        let margin = timeout / 10;
        assert!(!claim.lapsed(Instant::now() + timeout - margin - Duration::from_millis(1)));
        assert!(claim.lapsed(Instant::now() + timeout - margin));
        tokio::time::sleep(heartbeat).await;
        claim.renewed(a.renew_claim(&claim).await.unwrap());
        assert!(!claim.lapsed(Instant::now() + timeout - margin - Duration::from_millis(1)));
        let b = StoreLock::acquire(&b_store, timeout).await.unwrap();
        let started = Instant::now();
        let error = b.claim(&out, "job").await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::ZERO, "a fresh claim is refused at once");
        let said = error.to_string();
        assert!(matches!(error, LockError::JobHeld { .. }), "{said}");
        assert!(
            said.contains("job `job`: its output `memory://claim/out` is being distilled")
                && said.contains("store `memory://claim/a`"),
            "{said}"
        );
        let age = |seconds: u64| {
            let out = out.clone();
            async move {
                let key = out.key(&JobKeys::new("job").claim());
                let old = LockRecord { heartbeat_unix_ms: now_ms() - seconds * 1000, ..read(&out, "job").await };
                out.store.put(&key, PutPayload::from(serde_json::to_vec(&old).unwrap())).await.unwrap();
            }
        };
        let renewing = {
            let (claim, mut a) = (claim.clone(), a.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(heartbeat).await;
                    a.renew().await.unwrap();
                    a.renew_claim(&claim).await.unwrap();
                }
            })
        };
        // Looking 15 s old, it is watched: refused once it is renewed.
        age(15).await;
        let started = Instant::now();
        assert!(matches!(b.claim(&out, "job").await, Err(LockError::JobHeld { .. })));
        assert!(started.elapsed() <= heartbeat + poll, "refused after {:?}", started.elapsed());
        renewing.abort();
        age(15).await;
        let started = Instant::now();
        let taken = b.claim(&out, "job").await.unwrap();
        let waited = started.elapsed();
        assert!(waited >= timeout && waited <= timeout + poll, "taken over after {waited:?}");
        assert!(matches!(a.renew_claim(&claim).await, Err(LockError::ClaimLost { .. })));
        a.release_claim(&claim).await; // not its own any more: left alone
        assert_eq!(read(&out, "job").await.owner, b.record.owner);
        // `b` is killed; the next coordinator of its store takes the claim at once.
        drop(taken);
        let b2 = StoreLock::acquire(&b_store, timeout).await.unwrap();
        let started = Instant::now();
        let claim = b2.claim(&out, "job").await.unwrap();
        assert_eq!(started.elapsed(), Duration::ZERO);
        // Given up, it is free at once.
        b2.release_claim(&claim).await;
        let started = Instant::now();
        let c = StoreLock::acquire(&open("memory://claim/c"), timeout).await.unwrap();
        c.claim(&out, "job").await.unwrap();
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    /// A coordinator requeued onto another node of a shared file system takes over the store's
    /// lock from its killed predecessor after the timeout, and then that predecessor's claims at
    /// once: they are known to be the replaced owner's, whatever host wrote them.
    #[tokio::test(start_paused = true)]
    async fn the_claims_of_the_coordinator_whose_lock_was_taken_over_are_taken_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = mgd3_common::store::open(&dir.path().join("state").display().to_string()).unwrap();
        let out = mgd3_common::store::open("memory://requeue/out").unwrap();
        let timeout = Duration::from_secs(30);
        let killed = StoreLock::acquire(&store, timeout).await.unwrap();
        killed.claim(&out, "job").await.unwrap();
        // Its claim as a coordinator on another node would have written it.
        let key = out.key(&JobKeys::new("job").claim());
        let elsewhere = LockRecord { host: "node-7".into(), process_table: None, ..read(&out, "job").await };
        out.store.put(&key, PutPayload::from(serde_json::to_vec(&elsewhere).unwrap())).await.unwrap();
        let started = Instant::now();
        let next = StoreLock::acquire(&store, timeout).await.unwrap();
        assert!(started.elapsed() >= timeout, "the live-looking lock was taken at once");
        assert_eq!(next.replaced.as_deref(), Some(killed.record.owner.as_str()));
        let started = Instant::now();
        next.claim(&out, "job").await.unwrap();
        assert_eq!(started.elapsed(), Duration::ZERO, "the replaced owner's claim was waited for");
        assert_eq!(read(&out, "job").await.owner, next.record.owner);
    }

    /// A claim of another job copied over a job's claim (by hand) claims nothing: its holder
    /// renews its own over it, and a coordinator claiming the job takes it at once.
    #[tokio::test(start_paused = true)]
    async fn a_claim_of_another_job_claims_nothing() {
        let open = |url: &str| mgd3_common::store::open(url).unwrap();
        let out = open("memory://copied/out");
        let timeout = Duration::from_secs(30);
        let a = StoreLock::acquire(&open("memory://copied/a"), timeout).await.unwrap();
        let b = StoreLock::acquire(&open("memory://copied/b"), timeout).await.unwrap();
        let mine = a.claim(&out, "mine").await.unwrap();
        b.claim(&out, "theirs").await.unwrap();
        let copy = |from: &'static str, to: &'static str| {
            let out = out.clone();
            async move {
                let record = read(&out, from).await;
                let key = out.key(&JobKeys::new(to).claim());
                out.store.put(&key, PutPayload::from(serde_json::to_vec(&record).unwrap())).await.unwrap();
            }
        };
        copy("theirs", "mine").await;
        a.renew_claim(&mine).await.expect("a copied claim is no loss");
        assert_eq!(read(&out, "mine").await.job.as_deref(), Some("mine"));
        copy("mine", "theirs").await;
        let c = StoreLock::acquire(&open("memory://copied/c"), timeout).await.unwrap();
        let started = Instant::now();
        c.claim(&out, "theirs").await.unwrap();
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    async fn read(out: &Location, job: &str) -> LockRecord {
        let key = out.key(&JobKeys::new(job).claim());
        serde_json::from_slice(&get_optional(out.store.as_ref(), &key).await.unwrap().unwrap()).unwrap()
    }

    /// A record written before renewals were counted still reads, and its heartbeat time alone
    /// tells a watcher it is alive.
    #[test]
    fn renewals_are_seen_by_count_and_older_records_read() {
        let old = r#"{"owner":"a","host":"h","pid":7,"heartbeat_unix_ms":1000,"timeout_ms":60000}"#;
        let record: LockRecord = serde_json::from_str(old).unwrap();
        assert_eq!(record.beat(), (1000, 0));
        let renewed = LockRecord { heartbeat_unix_ms: 1001, ..record.clone() };
        assert_ne!(renewed.beat(), record.beat());
        // A renewal within the same millisecond is still a renewal.
        let same_tick = LockRecord { renewals: 1, ..record.clone() };
        assert_ne!(same_tick.beat(), record.beat());
    }

    /// A coordinator that died on this host (its process is gone) is taken over at once, not
    /// after its timeout; one whose process table is another (another host, boot or container)
    /// is waited for.
    #[tokio::test(start_paused = true)]
    async fn a_holder_whose_process_is_gone_here_is_taken_over_at_once() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = child.id();
        child.wait().unwrap();
        let host = hostname::get().unwrap().to_string_lossy().into_owned();
        let record = |process_table: Option<String>| LockRecord {
            store: None,
            job: None,
            owner: "crashed".into(),
            host: host.clone(),
            pid: dead_pid,
            heartbeat_unix_ms: now_ms(),
            timeout_ms: 60_000,
            renewals: 0,
            process_table,
            url: None,
            token_file: None,
            slurm_job: None,
            exits_when_done: false,
        };
        assert!(holder_is_dead_here(&record(process_table()), &host));
        assert!(!holder_is_dead_here(&record(Some("other-boot/pid:[1]".into())), &host));
        assert!(!holder_is_dead_here(&record(None), &host), "an old record proves nothing");
        let alive = LockRecord { pid: std::process::id(), ..record(process_table()) };
        assert!(!holder_is_dead_here(&alive, &host));

        let store = mgd3_common::store::open("memory://lock-test-dead/state").unwrap();
        let key = store.key(LOCK_KEY);
        let bytes = serde_json::to_vec(&record(process_table())).unwrap();
        store.store.put(&key, bytes.into()).await.unwrap();
        let started = Instant::now();
        let lock = StoreLock::acquire(&store, Duration::from_secs(60)).await.unwrap();
        assert_eq!(started.elapsed(), Duration::ZERO, "not one poll waited");
        lock.release().await;
    }
}
