//! The [`JobStore`] contract, run against every backend the coordinator supports for its state:
//! `memory://`, `file://` and `s3://` (moto; skipped unless installed, required in CI).

mod support;

use mgd3_common::job::{JobSpec, ResolvedJob};
use mgd3_common::layout::JobKeys;
use mgd3_common::store::{self, Location};
use mgd3_coordinator::Error;
use std::sync::Arc;

use futures::TryStreamExt;
use mgd3_coordinator::jobstore::{JobStore, ObjectJobStore, STATE_SCHEMA_VERSION, state_bytes_v2};
use mgd3_coordinator::scheduler::{PersistedJob, Shard, ShardError, ShardState};
use mgd3_tests::sim::counting::CountingStore;
use object_store::{ObjectStoreExt, PutPayload};

fn job(id: &str, fingerprint: &str, created: u64) -> ResolvedJob {
    let spec = JobSpec::from_toml(
        "dataset = \"/d\"\nclasses = \"all\"\nlabels = \"position\"\nipc = 2\n[models]\ndit = \"a\"\nvae_encoder = \"b\"\nvae_decoder = \"c\"",
    )
    .unwrap();
    let classes = spec.class_list(|| Ok(vec!["c0".into(), "c1".into(), "c2".into()])).unwrap();
    let shards = spec.plan_shards(classes.len());
    ResolvedJob { job_id: id.into(), fingerprint: fingerprint.into(), spec, classes, shards, created_unix_ms: created }
}

async fn put(location: &Location, relative: &str, bytes: &[u8]) {
    location.store.put(&location.key(relative), PutPayload::from(bytes.to_vec())).await.unwrap();
}

/// Everything a coordinator relies on, in one pass over an empty location.
async fn contract(location: Location) {
    let store = ObjectJobStore::new(location.clone());
    assert_eq!(store.url(), location.url);
    assert!(store.job_ids().await.unwrap().is_empty());
    assert!(store.load_jobs().await.unwrap().is_empty());

    // Create-only: the same job again is no change, another fingerprint under the id is refused.
    let first = job("b-job", "sha256:1", 20);
    assert!(store.create_job(&first).await.unwrap());
    assert!(!store.create_job(&first).await.unwrap());
    assert!(matches!(store.create_job(&job("b-job", "sha256:2", 20)).await, Err(Error::JobIdTaken { .. })));
    assert_eq!(store.read_job("b-job").await.unwrap(), first);
    assert!(matches!(store.read_job("nope").await, Err(Error::UnknownJob(_))));

    // State: none until written, then what was written, replaced by the next write.
    assert_eq!(store.read_state("b-job").await.unwrap(), None);
    let mut state = PersistedJob::default();
    state.excluded_workers.insert("w1".into());
    store.write_state("b-job", &state).await.unwrap();
    assert_eq!(store.read_state("b-job").await.unwrap(), Some(state.clone()));
    state.cancelled = true;
    store.write_state("b-job", &state).await.unwrap();
    assert_eq!(store.load_job("b-job").await.unwrap(), (first.clone(), Some(state.clone())));
    let raw = location.store.get(&location.key(&JobKeys::new("b-job").state_json())).await.unwrap();
    let raw: serde_json::Value = serde_json::from_slice(&raw.bytes().await.unwrap()).unwrap();
    assert_eq!(raw["schema_version"], STATE_SCHEMA_VERSION);

    // Shards live in records of their own beside state.json: a fresh process reads every one
    // back; a shard never leased has none.
    store.create_job(&job("g-sharded", "sha256:6", 40)).await.unwrap();
    let sharded = sharded_state(3);
    store.write_state("g-sharded", &sharded).await.unwrap();
    assert_eq!(ObjectJobStore::new(location.clone()).read_state("g-sharded").await.unwrap(), Some(sharded.clone()));
    assert_eq!(record_names(&location, "g-sharded").await, ["1.json", "2.json"]);
    let raw = location.store.get(&location.key(&JobKeys::new("g-sharded").state_json())).await.unwrap();
    let raw: serde_json::Value = serde_json::from_slice(&raw.bytes().await.unwrap()).unwrap();
    assert_eq!((raw.get("shards"), &raw["shard_count"]), (None, &serde_json::json!(3)), "{raw}");
    // A state file of schema 2 (every shard inside) reads as it was, and the next write moves
    // its shards into records (a fresh process reads the same).
    let mut older = sharded_state(4);
    put(&location, "jobs/g-sharded/state.json", &state_bytes_v2(&older)).await;
    let fresh = ObjectJobStore::new(location.clone());
    assert_eq!(fresh.read_state("g-sharded").await.unwrap(), Some(older.clone()));
    older.shards[3].attempts = 1;
    fresh.write_state("g-sharded", &older).await.unwrap();
    assert_eq!(ObjectJobStore::new(location.clone()).read_state("g-sharded").await.unwrap(), Some(older.clone()));
    assert_eq!(record_names(&location, "g-sharded").await, ["1.json", "2.json", "3.json"]);
    // Forgetting the job removes its records with it.
    assert!(!store.forget_job("g-sharded", false, None).await.unwrap(), "nothing but records was there");
    assert!(record_names(&location, "g-sharded").await.is_empty());
    assert!(matches!(store.read_job("g-sharded").await, Err(Error::UnknownJob(_))));

    // Listing: oldest first, damaged jobs reported with what is wrong, not skipped.
    let older = job("a-job", "sha256:3", 10);
    store.create_job(&older).await.unwrap();
    put(&location, "jobs/c-orphan/state.json", b"{}").await;
    put(&location, "jobs/d-torn/job.json", b"{\"job_id\":").await;
    put(&location, "jobs/e-other/job.json", &serde_json::to_vec(&job("x", "sha256:4", 5)).unwrap()).await;
    let newer = format!("{{\"schema_version\":{}}}", STATE_SCHEMA_VERSION + 1);
    store.create_job(&job("f-newer", "sha256:5", 30)).await.unwrap();
    put(&location, "jobs/f-newer/state.json", newer.as_bytes()).await;
    let jobs = store.load_jobs().await.unwrap();
    let ids: Vec<&str> = jobs.iter().map(|(id, _)| id.as_str()).collect();
    // Readable jobs by creation time (b-job was created after a-job), then the damaged ones.
    assert_eq!(ids, ["a-job", "b-job", "c-orphan", "d-torn", "e-other", "f-newer"]);
    let by_id = |id: &str| &jobs.iter().find(|(j, _)| j == id).unwrap().1;
    assert_eq!(by_id("a-job").as_ref().unwrap(), &(older, None));
    assert!(matches!(by_id("c-orphan"), Err(Error::Missing { path }) if path.contains("c-orphan/job.json")));
    assert!(matches!(by_id("d-torn"), Err(Error::Corrupt { path, .. }) if path.contains("d-torn/job.json")));
    assert!(matches!(by_id("e-other"), Err(Error::Corrupt { problem, .. }) if problem.contains("job `x`")));
    let Err(error) = by_id("f-newer") else { panic!("a newer state file must be refused") };
    assert!(matches!(error, Error::StateTooNew { found, .. } if *found == STATE_SCHEMA_VERSION + 1), "{error}");
    assert!(error.is_damage() && error.to_string().contains("newer mgd3"), "{error}");

    // A state file from before versioning reads as version 1.
    let legacy = br#"{"shards":[],"cancelled":true,"finished_unix_ms":7,"excluded_workers":[]}"#;
    put(&location, "jobs/a-job/state.json", legacy).await;
    let read = store.read_state("a-job").await.unwrap().unwrap();
    assert_eq!((read.cancelled, read.finished_unix_ms), (true, Some(7)));
}

/// A job state with `shards` shards: shard 1 leased on its second attempt after an error,
/// shard 2 done, the others never leased.
fn sharded_state(shards: usize) -> PersistedJob {
    let mut state =
        PersistedJob { shards: vec![Shard::pending(); shards], fingerprint: "sha256:6".into(), ..Default::default() };
    state.shards[1].attempts = 2;
    state.shards[1].last_error = Some(ShardError { wnid: Some("c1".into()), error: "out of memory".into(), at_ms: 3 });
    state.shards[1].state = ShardState::Leased {
        lease_id: "e-2".into(),
        attempt_id: "s1-a2-e-2".into(),
        worker_id: "w".into(),
        deadline_ms: 120_000,
        started_ms: 4,
    };
    state.shards[2].attempts = 1;
    state.shards[2].state = ShardState::Done { attempt_id: "s2-a1-e-1".into(), finished_ms: 5 };
    state
}

/// The names of a job's shard records, sorted.
async fn record_names(location: &Location, job_id: &str) -> Vec<String> {
    let prefix = location.key(&JobKeys::new(job_id).shard_records());
    let listed: Vec<_> = location.store.list(Some(&prefix)).try_collect().await.unwrap();
    let mut names: Vec<String> = listed.iter().filter_map(|m| m.location.filename().map(str::to_owned)).collect();
    names.sort();
    names
}

/// What persisting one event costs does not grow with the job: a lease, a renewal, progress
/// and a finished shard write the same bytes for a job of 10 shards and one of 10,000, and a
/// renewal (only the lease's deadline moves) writes nothing.
#[tokio::test]
async fn a_flush_writes_the_shards_that_changed_whatever_the_jobs_size() {
    let mut per_size = Vec::new();
    for shards in [10, 10_000] {
        let counting = Arc::new(CountingStore::new(Arc::new(object_store::memory::InMemory::new())));
        let location = Location {
            url: "memory://counted/state".into(),
            store: counting.clone(),
            prefix: object_store::path::Path::from("state"),
            local_root: None,
        };
        let store = ObjectJobStore::new(location);
        let mut state = PersistedJob { shards: vec![Shard::pending(); shards], ..Default::default() };
        let mut steps = Vec::new();
        let write = async |state: &PersistedJob| {
            let before = counting.requests();
            store.write_state("j", state).await.unwrap();
            let after = counting.requests();
            (after.put - before.put, after.put_bytes - before.put_bytes)
        };
        let (puts, _) = write(&state).await;
        assert_eq!(puts, 1, "a new job writes state.json and no record of a never-leased shard");
        let lease = |deadline_ms| ShardState::Leased {
            lease_id: "e-1".into(),
            attempt_id: "s3-a1-e-1".into(),
            worker_id: "w".into(),
            deadline_ms,
            started_ms: 0,
        };
        state.shards[3].attempts = 1;
        state.shards[3].state = lease(120_000);
        steps.push(write(&state).await);
        state.shards[3].state = lease(122_000);
        steps.push(write(&state).await);
        state.shards[3].images_done = 50;
        state.shards[3].classes_done = 1;
        steps.push(write(&state).await);
        state.shards[3].state = ShardState::Done { attempt_id: "s3-a1-e-1".into(), finished_ms: 9 };
        steps.push(write(&state).await);
        assert_eq!(steps.iter().map(|(puts, _)| *puts).collect::<Vec<_>>(), [1, 0, 1, 1], "{shards} shards");
        assert!(steps.iter().all(|(_, bytes)| *bytes < 300), "{steps:?}");
        per_size.push(steps);
    }
    assert_eq!(per_size[0], per_size[1], "bytes per event do not depend on the job's size");
}

#[tokio::test]
async fn memory_stores_keep_the_contract() {
    contract(store::open("memory://jobstore-contract/state").unwrap()).await;
}

#[tokio::test]
async fn local_folders_keep_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    contract(store::open(&dir.path().join("state").display().to_string()).unwrap()).await;
    let url = format!("file://{}", dir.path().join("other").display());
    contract(store::open(&url).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_buckets_keep_the_contract() {
    let Some(moto) = support::moto() else { return };
    support::create_bucket(moto.port, "jobstore");
    let location = Location {
        url: "s3://jobstore/state".into(),
        store: support::bucket(moto.port, "jobstore"),
        prefix: object_store::path::Path::from("state"),
        local_root: None,
    };
    contract(location).await;
}
