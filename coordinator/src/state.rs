//! Durable coordinator state in the object store: `job.json` (immutable, create-only) and
//! `state.json` (rewritten) per job, the recovery scan on start-up, commit-marker scans and the
//! merged manifest. Markers are the truth about what is done; state.json only keeps attempts,
//! failures and leases across restarts.

use std::collections::{BTreeMap, HashSet};

use futures::{StreamExt, TryStreamExt};
use mgd3_common::commit::committed_marker;
use mgd3_common::job::ResolvedJob;
use mgd3_common::layout::JobKeys;
use mgd3_common::manifest::{JobManifest, ManifestClass, SCHEMA_VERSION, StageSeconds};
use mgd3_common::store::{Location, get_optional, put_create};
use object_store::{ObjectStoreExt, PutPayload};

use crate::error::{Error, Result};
use crate::scheduler::PersistedJob;

fn store_err(location: &Location, context: String) -> impl FnOnce(object_store::Error) -> Error {
    let url = location.url.clone();
    move |source| Error::ObjectStore { url, context, source }
}

/// Writes job.json create-only. Returns false when the same job (same fingerprint) exists.
pub async fn write_job(store: &Location, job: &ResolvedJob) -> Result<bool> {
    let keys = JobKeys::new(&job.job_id);
    let key = store.key(&keys.job_json());
    let bytes = serde_json::to_vec_pretty(job).expect("serialisable job");
    if put_create(store.store.as_ref(), &key, bytes).await.map_err(store_err(store, format!("writing `{key}`")))? {
        return Ok(true);
    }
    let existing = read_job(store, &job.job_id).await?;
    if existing.fingerprint != job.fingerprint {
        return Err(Error::JobIdTaken { job: job.job_id.clone() });
    }
    Ok(false)
}

pub async fn read_job(store: &Location, job_id: &str) -> Result<ResolvedJob> {
    let key = store.key(&JobKeys::new(job_id).job_json());
    let bytes = get_optional(store.store.as_ref(), &key)
        .await
        .map_err(store_err(store, format!("reading `{key}`")))?
        .ok_or_else(|| Error::UnknownJob(job_id.into()))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt { path: key.to_string(), problem: e.to_string() })
}

pub async fn write_state(store: &Location, job_id: &str, state: &PersistedJob) -> Result<()> {
    let key = store.key(&JobKeys::new(job_id).state_json());
    let bytes = serde_json::to_vec(state).expect("serialisable state");
    store.store.put(&key, PutPayload::from(bytes)).await.map_err(store_err(store, format!("writing `{key}`")))?;
    Ok(())
}

async fn read_state(store: &Location, job_id: &str) -> Result<Option<PersistedJob>> {
    let key = store.key(&JobKeys::new(job_id).state_json());
    let Some(bytes) =
        get_optional(store.store.as_ref(), &key).await.map_err(store_err(store, format!("reading `{key}`")))?
    else {
        return Ok(None);
    };
    // A torn or old state file only loses attempt counts: markers still say what is done.
    Ok(serde_json::from_slice(&bytes)
        .inspect_err(|e| tracing::warn!(%key, error = %e, "ignoring unreadable state file"))
        .ok())
}

/// One job's records: `job.json` (required: [`Error::Missing`] without it, [`Error::Corrupt`]
/// when unreadable) and its persisted state, if any.
pub async fn load_job(store: &Location, job_id: &str) -> Result<(ResolvedJob, Option<PersistedJob>)> {
    let job = match read_job(store, job_id).await {
        Err(Error::UnknownJob(_)) => {
            return Err(Error::Missing { path: store.key(&JobKeys::new(job_id).job_json()).to_string() });
        }
        other => other?,
    };
    if job.job_id != job_id {
        return Err(Error::Corrupt {
            path: store.key(&JobKeys::new(job_id).job_json()).to_string(),
            problem: format!("it describes job `{}`", job.job_id),
        });
    }
    Ok((job, read_state(store, job_id).await?))
}

/// Every job folder under `<store>/jobs/`, oldest first, each with its records or what is wrong
/// with them (a folder without `job.json` is reported, not skipped). Fails only when the store
/// cannot be listed or read.
pub async fn load_jobs(store: &Location) -> Result<Vec<(String, Result<(ResolvedJob, Option<PersistedJob>)>)>> {
    let prefix = store.key(JobKeys::JOBS);
    let listing = store
        .store
        .list_with_delimiter(Some(&prefix))
        .await
        .map_err(store_err(store, format!("listing `{prefix}`")))?;
    let mut jobs = Vec::new();
    for dir in listing.common_prefixes {
        let Some(job_id) = dir.filename() else {
            continue;
        };
        let loaded = match load_job(store, job_id).await {
            Err(error) if !error.is_damage() => return Err(error),
            loaded => loaded,
        };
        jobs.push((job_id.to_owned(), loaded));
    }
    jobs.sort_by_key(|(id, loaded)| {
        (loaded.as_ref().map(|(job, _)| job.created_unix_ms).unwrap_or(u64::MAX), id.clone())
    });
    Ok(jobs)
}

/// Shards of `job` whose every class has a commit marker naming the job's fingerprint.
/// A marker of another fingerprint is an error (the output folder holds another spec's work).
pub async fn committed_shards(out: &Location, job: &ResolvedJob) -> Result<HashSet<usize>> {
    let keys = JobKeys::new(&job.job_id);
    let prefix = out.key(&keys.markers());
    let present: HashSet<String> = out
        .store
        .list(Some(&prefix))
        .map_ok(|meta| meta.location.filename().unwrap_or_default().trim_end_matches(".json").to_owned())
        .try_collect()
        .await
        .map_err(store_err(out, format!("listing `{prefix}`")))?;
    let candidates: Vec<String> =
        job.classes.iter().filter(|c| present.contains(&c.wnid)).map(|c| c.wnid.clone()).collect();
    let checks = candidates.into_iter().map(|wnid| {
        let (out, keys, fingerprint) = (out.clone(), keys.clone(), job.fingerprint.clone());
        async move { committed_marker(&out, &keys, &wnid, &fingerprint).await.map(|m| m.map(|_| wnid)) }
    });
    let mut verified = HashSet::new();
    let mut results = futures::stream::iter(checks).buffer_unordered(16);
    while let Some(result) = results.next().await {
        if let Some(wnid) = result? {
            verified.insert(wnid);
        }
    }
    Ok((0..job.shards.len()).filter(|&i| job.shard_classes(i).iter().all(|c| verified.contains(&c.wnid))).collect())
}

/// True when `manifest.json` of `job` is in place and certifies this job (its id and spec
/// fingerprint). Recovery checks this artefact, not the `finished` flag of state.json.
pub async fn manifest_in_place(out: &Location, job: &ResolvedJob) -> Result<bool> {
    let key = out.key(&JobKeys::new(&job.job_id).manifest());
    let Some(bytes) =
        get_optional(out.store.as_ref(), &key).await.map_err(store_err(out, format!("reading `{key}`")))?
    else {
        return Ok(false);
    };
    Ok(serde_json::from_slice::<JobManifest>(&bytes).is_ok_and(|m| {
        m.job_id == job.job_id && m.fingerprint == job.fingerprint && m.classes.len() == job.classes.len()
    }))
}

/// Writes `manifest.json` from the markers of a finished job.
pub async fn write_manifest(out: &Location, job: &ResolvedJob, finished_unix_ms: u64) -> Result<()> {
    let keys = JobKeys::new(&job.job_id);
    let mut classes = Vec::with_capacity(job.classes.len());
    let mut timings = StageSeconds::default();
    let mut images = 0;
    for (index, class) in job.classes.iter().enumerate() {
        let marker =
            committed_marker(out, &keys, &class.wnid, &job.fingerprint).await?.ok_or_else(|| Error::MissingMarker {
                shard: job.shards.iter().position(|&(from, to)| (from..to).contains(&index)).unwrap_or_default(),
                wnid: class.wnid.clone(),
                output: out.url.clone(),
            })?;
        timings.add(&marker.timings);
        images += marker.images.len() as u64;
        classes.push(ManifestClass {
            wnid: class.wnid.clone(),
            label: class.label,
            images: marker.images,
            modes_sha256: marker.modes.sha256,
            attempt_id: marker.attempt_id,
        });
    }
    let m = &job.spec.models;
    let model_fingerprints: BTreeMap<String, String> = [
        ("dit", &m.dit_fingerprint),
        ("vae_encoder", &m.vae_encoder_fingerprint),
        ("vae_decoder", &m.vae_decoder_fingerprint),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.clone().map(|v| (k.to_owned(), v)))
    .collect();
    let manifest = JobManifest {
        schema_version: SCHEMA_VERSION,
        job_id: job.job_id.clone(),
        fingerprint: job.fingerprint.clone(),
        spec: job.spec.clone(),
        model_fingerprints,
        classes,
        images,
        timings,
        created_unix_ms: job.created_unix_ms,
        finished_unix_ms,
    };
    let key = out.key(&keys.manifest());
    let bytes = serde_json::to_vec_pretty(&manifest).expect("serialisable manifest");
    out.store.put(&key, PutPayload::from(bytes)).await.map_err(store_err(out, format!("writing `{key}`")))?;
    mgd3_common::commit::delete_prefix(out, &format!("{}/staging", keys.root())).await?;
    // Every class is committed: copies left by workers killed mid-write (local stores) go, so the
    // published tree holds exactly the markers' files when the job reports success.
    let zero = std::time::Duration::ZERO;
    let modes = format!("{}/modes", keys.root());
    for class in &job.classes {
        let wnid = &class.wnid;
        mgd3_common::commit::remove_staging_copies(out, &format!("{}/dataset/{wnid}", keys.root()), "", zero)?;
        mgd3_common::commit::remove_staging_copies(out, &modes, &format!("{wnid}.npy#"), zero)?;
        mgd3_common::commit::remove_staging_copies(out, &keys.markers(), &format!("{wnid}.json#"), zero)?;
        let sheets = format!("{}/contact_sheets", keys.root());
        mgd3_common::commit::remove_staging_copies(out, &sheets, &format!("{wnid}.png#"), zero)?;
    }
    Ok(())
}
