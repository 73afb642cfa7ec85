//! The [`JobStore`] contract, run against every backend the coordinator supports for its state:
//! `memory://`, `file://` and `s3://` (moto; skipped unless installed, required in CI).

mod support;

use mgd3_common::job::{JobSpec, ResolvedJob};
use mgd3_common::layout::JobKeys;
use mgd3_common::store::{self, Location};
use mgd3_coordinator::Error;
use mgd3_coordinator::jobstore::{JobStore, ObjectJobStore, STATE_SCHEMA_VERSION};
use mgd3_coordinator::scheduler::PersistedJob;
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
