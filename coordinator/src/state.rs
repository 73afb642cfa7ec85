//! What the coordinator reads and writes in a job's output store: commit-marker scans (which
//! shards are done), the merged `manifest.json` of a finished job. Markers are the truth about
//! what is done; the job's own records (`job.json`, `state.json`) are behind
//! [`crate::jobstore::JobStore`].

use std::collections::{BTreeMap, HashSet};

use futures::{StreamExt, TryStreamExt};
use mgd3_common::commit::committed_marker;
use mgd3_common::job::ResolvedJob;
use mgd3_common::layout::JobKeys;
use mgd3_common::manifest::{JobManifest, ManifestClass, SCHEMA_VERSION, StageSeconds};
use mgd3_common::store::{Location, get_optional};
use object_store::{ObjectStoreExt, PutPayload};

use crate::error::{Error, Result};

fn store_err(location: &Location, context: String) -> impl FnOnce(object_store::Error) -> Error {
    let url = location.url.clone();
    move |source| Error::ObjectStore { url, context, source }
}

/// The classes (wnids) of a job that have a commit marker file, whatever it holds.
///
/// # Errors
/// [`Error::ObjectStore`] when the markers cannot be listed.
async fn marked_classes(out: &Location, keys: &JobKeys) -> Result<Vec<String>> {
    let prefix = out.key(&keys.markers());
    out.store
        .list(Some(&prefix))
        .map_ok(|meta| meta.location.filename().unwrap_or_default().trim_end_matches(".json").to_owned())
        .try_collect()
        .await
        .map_err(store_err(out, format!("listing `{prefix}`")))
}

/// Shards of `job` whose every class has a commit marker naming the job's fingerprint.
/// A marker of another fingerprint is an error (the output folder holds another spec's work).
///
/// # Errors
/// [`Error::ObjectStore`] when the markers cannot be listed; [`Error::Commit`] for a marker that
/// cannot be read or parsed, or names another fingerprint.
pub async fn committed_shards(out: &Location, job: &ResolvedJob) -> Result<HashSet<usize>> {
    let keys = JobKeys::new(&job.job_id);
    let present: HashSet<String> = marked_classes(out, &keys).await?.into_iter().collect();
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

/// How `job` (a spec submitted to rebuild a lost `job.json`) differs from the work committed under
/// its id: markers of another fingerprint, classes committed at another label or position or
/// that are no class of `job`, and the settings in which a manifest's spec differs. Empty when
/// nothing committed contradicts `job`. Unreadable markers are left to recovery, which
/// quarantines them by name.
///
/// # Errors
/// [`Error::ObjectStore`] when the markers cannot be listed or the manifest read.
pub async fn differences_from_committed(out: &Location, job: &ResolvedJob) -> Result<Vec<String>> {
    let keys = JobKeys::new(&job.job_id);
    let wnids = marked_classes(out, &keys).await?;
    let reads = wnids.into_iter().map(|wnid| {
        let (out, keys) = (out.clone(), keys.clone());
        async move { mgd3_common::commit::read_marker(&out, &keys, &wnid).await.ok().flatten() }
    });
    let markers: Vec<_> = futures::stream::iter(reads).buffer_unordered(16).filter_map(|m| async { m }).collect().await;
    let mut differences = Vec::new();
    let mut foreign: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut classes = Vec::new();
    for marker in &markers {
        if marker.fingerprint != job.fingerprint {
            foreign.entry(marker.fingerprint.clone()).or_default().push(marker.wnid.clone());
        }
        match job.classes.iter().find(|c| c.wnid == marker.wnid) {
            None => classes.push(format!("class `{}` is committed but is no class of this spec", marker.wnid)),
            Some(class) if class.label != marker.label || class.class_index != marker.class_index => {
                classes.push(format!(
                    "class `{}` was committed as label {} at position {}, this spec gives label {} at position {}",
                    marker.wnid, marker.label, marker.class_index, class.label, class.class_index
                ));
            }
            Some(_) => {}
        }
    }
    for (fingerprint, mut wnids) in foreign {
        wnids.sort();
        let shown = wnids.iter().take(3).map(|w| format!("`{w}`")).collect::<Vec<_>>().join(", ");
        let more = if wnids.len() > 3 { format!(" and {} more", wnids.len() - 3) } else { String::new() };
        differences.push(format!(
            "{} committed class(es) ({shown}{more}) carry fingerprint {fingerprint}, this spec's is {}",
            wnids.len(),
            job.fingerprint
        ));
    }
    classes.sort();
    differences.extend(classes);
    let key = out.key(&keys.manifest());
    let manifest = get_optional(out.store.as_ref(), &key).await.map_err(store_err(out, format!("reading `{key}`")))?;
    if let Some(manifest) = manifest.and_then(|bytes| serde_json::from_slice::<JobManifest>(&bytes).ok())
        && manifest.fingerprint != job.fingerprint
    {
        let settings = spec_differences(&manifest.spec, &job.spec, ("when committed", "now"));
        if settings.is_empty() {
            differences.push(
                "the manifest's spec has the same settings, so the dataset's images differ from those the job was made from (its fingerprint covers them)"
                    .to_owned(),
            );
        }
        differences.extend(settings.into_iter().map(|s| format!("{s} (as the job's manifest.json has it)")));
    }
    Ok(differences)
}

/// The settings in which two specs differ, `` `key`: <was> <labels.0>, <now> <labels.1> `` with
/// nested tables as `table.key`.
pub(crate) fn spec_differences(
    was: &mgd3_common::job::JobSpec,
    now: &mgd3_common::job::JobSpec,
    labels: (&str, &str),
) -> Vec<String> {
    fn walk(path: &str, was: &serde_json::Value, now: &serde_json::Value, labels: (&str, &str), out: &mut Vec<String>) {
        match (was, now) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                for key in keys {
                    let null = serde_json::Value::Null;
                    let name = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                    walk(&name, a.get(key).unwrap_or(&null), b.get(key).unwrap_or(&null), labels, out);
                }
            }
            (a, b) if a != b => {
                let shown =
                    |v: &serde_json::Value| if v.is_null() { "unset (the default)".to_owned() } else { v.to_string() };
                out.push(format!("`{path}`: {} {}, {} {}", shown(a), labels.0, shown(b), labels.1))
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    let (was, now) = (serde_json::to_value(was), serde_json::to_value(now));
    if let (Ok(was), Ok(now)) = (was, now) {
        walk("", &was, &now, labels, &mut out);
    }
    out
}

/// `coordinator verify --job-dir`: checks a job's output folder without its coordinator. `out` is
/// the output root (the folder holding `jobs/`). Every commit marker's files are checked against
/// its sha256s ([`mgd3_common::commit::verify_class`]), folders under `dataset/` without a marker
/// are named, and when `manifest.json` is there, every class it lists must have a marker of its
/// fingerprint. Without a manifest the job is taken as unfinished: classes without a marker are
/// work to come (`running` is set), not problems.
///
/// # Errors
/// [`Error::ObjectStore`] / [`Error::Commit`] when the folder cannot be listed or read.
pub async fn verify_offline(out: &Location, job_id: &str) -> Result<mgd3_common::status::VerifyReport> {
    use mgd3_common::status::{VerifyProblem, VerifyReport};
    let keys = JobKeys::new(job_id);
    let wnids = marked_classes(out, &keys).await?;
    let manifest_key = out.key(&keys.manifest());
    let manifest = get_optional(out.store.as_ref(), &manifest_key)
        .await
        .map_err(store_err(out, format!("reading `{manifest_key}`")))?;
    let mut problems = Vec::new();
    let manifest = match manifest.map(|bytes| serde_json::from_slice::<JobManifest>(&bytes)) {
        // Another job's folder (folders swapped, renamed or copied): nothing in it is this job's,
        // and nothing to repair (resume would take another job's files for damage).
        Some(Ok(manifest)) if manifest.job_id != job_id => {
            return Err(Error::OtherJobsFolder { folder: out.url.clone(), job: job_id.into(), found: manifest.job_id });
        }
        Some(Ok(manifest)) => Some(manifest),
        Some(Err(error)) => {
            problems.push(VerifyProblem {
                wnid: String::new(),
                file: Some(keys.manifest()),
                problem: format!("unreadable: {error}"),
            });
            None
        }
        None => None,
    };
    let mut report = VerifyReport {
        classes_checked: manifest.as_ref().map_or(wnids.len(), |m| m.classes.len()) as u32,
        files_checked: 0,
        problems: Vec::new(),
        classes_committed: 0,
        running: manifest.is_none(),
        state: None,
        sheets_missing: Vec::new(),
    };
    let mut committed = std::collections::HashSet::new();
    for wnid in &wnids {
        let marker = match mgd3_common::commit::read_marker(out, &keys, wnid).await {
            Ok(Some(marker)) => marker,
            Ok(None) => continue,
            Err(error) => {
                problems.push(VerifyProblem {
                    wnid: wnid.clone(),
                    file: Some(keys.marker(wnid)),
                    problem: mgd3_common::error_chain(&error),
                });
                continue;
            }
        };
        if marker.job_id != job_id {
            problems.push(VerifyProblem {
                wnid: wnid.clone(),
                file: Some(keys.marker(wnid)),
                problem: format!("is a commit of job `{}`, not of `{job_id}`", marker.job_id),
            });
            continue;
        }
        if let Some(manifest) = &manifest
            && marker.fingerprint != manifest.fingerprint
        {
            problems.push(VerifyProblem {
                wnid: wnid.clone(),
                file: Some(keys.marker(wnid)),
                problem: format!(
                    "names fingerprint {}, the job's manifest {}",
                    marker.fingerprint, manifest.fingerprint
                ),
            });
            continue;
        }
        let (files, found, sheet_missing) = mgd3_common::commit::verify_class(out, &keys, &marker).await?;
        if sheet_missing {
            report.sheets_missing.push(wnid.clone());
        }
        report.files_checked += files;
        report.classes_committed += 1;
        committed.insert(wnid.clone());
        problems.extend(found.into_iter().map(|p| VerifyProblem {
            wnid: wnid.clone(),
            file: Some(p.file),
            problem: p.problem,
        }));
    }
    if let Some(manifest) = &manifest {
        for class in manifest.classes.iter().filter(|c| !committed.contains(&c.wnid)) {
            problems.push(VerifyProblem {
                wnid: class.wnid.clone(),
                file: None,
                problem: "in the manifest, but not committed".into(),
            });
        }
    }
    let classes: Vec<String> =
        manifest.as_ref().map_or_else(|| wnids.clone(), |m| m.classes.iter().map(|c| c.wnid.clone()).collect());
    let ipc = manifest.as_ref().map_or(0, |m| m.spec.ipc);
    problems.extend(blocked_problems(out, &keys, &classes, ipc));
    // The job's classes: those with a marker, and those its manifest lists (a class whose marker
    // is lost is not a folder of no class).
    let mut marked: HashSet<String> = wnids.iter().cloned().collect();
    marked.extend(manifest.iter().flat_map(|m| m.classes.iter().map(|c| c.wnid.clone())));
    for stray in dataset_strays(out, &keys, &marked).await? {
        let problem = stray.problem();
        problems.push(VerifyProblem { wnid: String::new(), file: Some(stray.path), problem });
    }
    report.problems = problems;
    report.sheets_missing.sort();
    Ok(report)
}

/// On a local store, the paths of the job where a file stands in place of one of its folders
/// (`shards/`, `dataset/`, `modes/`, `contact_sheets/`, a class folder `dataset/<class>/`) or a
/// folder in place of one of its files (a marker, modes, an image `0.png` … of the `ipc`, a
/// contact sheet or its record), each with what is wrong: whatever it stands for reads as
/// missing, and nothing can be written there. Relative to the output. Empty elsewhere. With
/// `markers_only`, only the job's folders and the markers (what a coordinator reads at start,
/// one look per class); else every file the job's classes hold.
pub(crate) fn blocked_paths(
    out: &Location,
    keys: &JobKeys,
    classes: &[String],
    ipc: usize,
    markers_only: bool,
) -> Vec<(String, String)> {
    if out.local_root.is_none() {
        return Vec::new();
    }
    let mut found = Vec::new();
    let mut expect = |relative: String, folder: bool| {
        let Some(path) = out.local_path(&relative) else { return };
        let Ok(meta) = std::fs::metadata(&path) else { return };
        if meta.is_dir() != folder {
            let what = if folder {
                "is a file where the job keeps a folder: what the folder holds reads as missing"
            } else {
                "is a folder where the job keeps a file: it reads as missing and cannot be written"
            };
            found.push((relative, what.to_owned()));
        }
    };
    for folder in ["shards", "dataset", "modes", "contact_sheets"] {
        expect(format!("{}/{folder}", keys.root()), true);
    }
    for wnid in classes {
        expect(keys.marker(wnid), false);
        if markers_only {
            continue;
        }
        expect(keys.modes(wnid), false);
        expect(keys.contact_sheet(wnid), false);
        expect(keys.contact_sheet_record(wnid), false);
        let folder = format!("{}/dataset/{wnid}", keys.root());
        let is_dir = out.local_path(&folder).and_then(|p| std::fs::metadata(p).ok()).map(|m| m.is_dir());
        expect(folder, true);
        if is_dir == Some(true) {
            for j in 0..ipc {
                expect(keys.dataset_image(wnid, j), false);
            }
        }
    }
    found
}

/// [`blocked_paths`] as `verify` problems (`resume` leaves them in place).
pub(crate) fn blocked_problems(
    out: &Location,
    keys: &JobKeys,
    classes: &[String],
    ipc: usize,
) -> Vec<mgd3_common::status::VerifyProblem> {
    blocked_paths(out, keys, classes, ipc, false)
        .into_iter()
        .map(|(file, what)| mgd3_common::status::VerifyProblem {
            wnid: String::new(),
            file: Some(file),
            problem: format!("{what}; `resume` leaves it in place: move it away"),
        })
        .collect()
}

/// What a job's `dataset/` folder holds besides its classes' folders ([`dataset_strays`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Stray {
    /// Its path, relative to the output (`jobs/<job>/dataset/<name>`).
    pub path: String,
    /// What it is.
    pub kind: StrayKind,
}

/// What a [`Stray`] is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum StrayKind {
    /// A folder of no class of the job; `foreign` names a file in it that no class folder
    /// holds (not an image directly in it: another job's records, say), if any.
    Folder {
        /// The first such file found.
        foreign: Option<String>,
    },
    /// A file directly in `dataset/` (no class's: ImageFolder loaders skip it, others choke).
    File,
}

impl Stray {
    /// Whether `resume` removes it: a folder of images only (a class of no class of the job,
    /// which would add a class to the dataset), or the temporary of an interrupted write.
    /// Anything else is not the job's to remove.
    pub fn removable(&self) -> bool {
        match &self.kind {
            StrayKind::Folder { foreign } => foreign.is_none(),
            StrayKind::File => self.path.contains('#'),
        }
    }

    /// What `verify` says of it.
    pub fn problem(&self) -> String {
        match &self.kind {
            StrayKind::Folder { foreign: None } => {
                "a class folder of no class of this job (it would add a class to the dataset)".into()
            }
            StrayKind::Folder { foreign: Some(file) } => format!(
                "a folder of no class of this job, holding more than a class's images (`{file}`): it would add a \
                 class to the dataset; `resume` leaves it in place: move it out of the job's dataset folder by hand"
            ),
            StrayKind::File if self.removable() => {
                "the temporary file of an interrupted write, beside the class folders (`resume` removes it)".into()
            }
            StrayKind::File => {
                "a file beside the class folders, of no class of this job (`resume` leaves it in place: \
                                move it out of the job's dataset folder by hand)"
                    .into()
            }
        }
    }
}

/// What job `keys`' `dataset/` folder in `out` holds besides the folders of `classes`: other
/// folders (each listed once more, to tell a stray class of images from something else's), and
/// files directly in it.
///
/// # Errors
/// [`Error::ObjectStore`] when the folder cannot be listed.
pub(crate) async fn dataset_strays(out: &Location, keys: &JobKeys, classes: &HashSet<String>) -> Result<Vec<Stray>> {
    let relative = format!("{}/dataset", keys.root());
    let prefix = out.key(&relative);
    let listing =
        out.store.list_with_delimiter(Some(&prefix)).await.map_err(store_err(out, format!("listing `{prefix}`")))?;
    let mut strays = Vec::new();
    for name in listing.common_prefixes.iter().filter_map(|p| p.filename()).filter(|name| !classes.contains(*name)) {
        let path = format!("{relative}/{name}");
        // What a class folder holds: images (and the temporaries of their writes), directly.
        let inside = out.key(&path);
        let objects: Vec<_> =
            out.store.list(Some(&inside)).try_collect().await.map_err(store_err(out, format!("listing `{inside}`")))?;
        let foreign = objects.iter().find_map(|object| {
            let rest = object.location.as_ref().strip_prefix(inside.as_ref())?.trim_start_matches('/');
            let ours = mgd3_common::commit::written_by_mgd3(&inside, &object.location)
                || !rest.contains('/') && rest.contains('#');
            (!ours).then(|| format!("{path}/{rest}"))
        });
        strays.push(Stray { path, kind: StrayKind::Folder { foreign } });
    }
    // A local store's listing leaves out the temporaries of its writes (`name#digits`): the
    // folder itself is read.
    let files: Vec<String> = match &out.local_root {
        Some(root) => match std::fs::read_dir(root.join(&relative)) {
            Ok(entries) => entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(Error::Io {
                    what: "dataset folder",
                    path: root.join(&relative).display().to_string(),
                    source,
                });
            }
        },
        None => listing.objects.iter().filter_map(|o| o.location.filename().map(str::to_owned)).collect(),
    };
    let mut files = files;
    files.sort();
    strays.extend(files.into_iter().map(|name| Stray { path: format!("{relative}/{name}"), kind: StrayKind::File }));
    Ok(strays)
}

/// Removes `stray` from `out` (what [`Stray::removable`] allows; the caller checks).
///
/// # Errors
/// [`Error::Commit`] / [`Error::ObjectStore`] / [`Error::Io`] when it cannot be removed.
pub(crate) async fn remove_stray(out: &Location, stray: &Stray) -> Result<()> {
    match (&stray.kind, &out.local_root) {
        (StrayKind::Folder { .. }, _) => Ok(mgd3_common::commit::delete_prefix(out, &stray.path).await?),
        (StrayKind::File, Some(root)) => match std::fs::remove_file(root.join(&stray.path)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => {
                Err(Error::Io { what: "stray file", path: root.join(&stray.path).display().to_string(), source })
            }
        },
        (StrayKind::File, None) => match out.store.delete(&out.key(&stray.path)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(store_err(out, format!("deleting `{}`", stray.path))(source)),
        },
    }
}

/// What is missing or has another size among the published files of a finished job, against
/// its `manifest.json` (each class's images and modes), and what `dataset/` holds that no class
/// lists — one listing of the job's `dataset/` and `modes/`,
/// no file read: what submitting a finished job's spec again checks before answering that it
/// succeeded. Each problem names the file (`dataset/<class>/<j>.png: missing`); a manifest that
/// is missing or unreadable is one problem.
///
/// # Errors
/// [`Error::ObjectStore`] when the store cannot be read or listed.
pub async fn published_problems(out: &Location, job: &ResolvedJob) -> Result<Vec<String>> {
    let keys = JobKeys::new(&job.job_id);
    let key = out.key(&keys.manifest());
    let bytes = get_optional(out.store.as_ref(), &key).await.map_err(store_err(out, format!("reading `{key}`")))?;
    let Some(manifest) = bytes.and_then(|bytes| serde_json::from_slice::<JobManifest>(&bytes).ok()) else {
        return Ok(vec![format!("{}: missing or unreadable", keys.manifest())]);
    };
    let mut present = std::collections::HashMap::new();
    for folder in ["dataset", "modes"] {
        let prefix = out.key(&format!("{}/{folder}", keys.root()));
        let listed: Vec<_> =
            mgd3_common::store::retry_idempotent(|| out.store.list(Some(&prefix)).try_collect::<Vec<_>>())
                .await
                .map_err(store_err(out, format!("listing `{prefix}`")))?;
        present.extend(listed.into_iter().map(|o| (o.location, o.size)));
    }
    let relative = |target: &str| target.strip_prefix(keys.root()).unwrap_or(target).trim_start_matches('/').to_owned();
    let mut problems = Vec::new();
    let mut expected = HashSet::new();
    for class in &manifest.classes {
        expected.insert(out.key(&keys.modes(&class.wnid)));
        for (j, image) in class.images.iter().enumerate() {
            let target = keys.dataset_image(&class.wnid, j);
            expected.insert(out.key(&target));
            match present.get(&out.key(&target)) {
                None => problems.push(format!("{}: missing", relative(&target))),
                Some(&size) if size != image.bytes => {
                    problems.push(format!("{}: {size} bytes, the manifest says {}", relative(&target), image.bytes))
                }
                Some(_) => {}
            }
        }
        let modes = keys.modes(&class.wnid);
        match (present.get(&out.key(&modes)), class.modes_bytes) {
            (None, _) => problems.push(format!("{}: missing", relative(&modes))),
            (Some(&size), Some(bytes)) if size != bytes => {
                problems.push(format!("{}: {size} bytes, the manifest says {bytes}", relative(&modes)))
            }
            _ => {}
        }
    }
    // A file no class lists (an image copied in by hand): the ImageFolder would hold it too.
    let (dataset, root) = (out.key(&format!("{}/dataset/", keys.root())), out.key(keys.root()));
    let mut strays: Vec<String> = present
        .keys()
        .filter(|key| key.as_ref().starts_with(dataset.as_ref()) && !expected.contains(*key))
        .map(|key| key.as_ref().strip_prefix(root.as_ref()).unwrap_or(key.as_ref()).trim_start_matches('/').to_owned())
        .collect();
    strays.sort();
    problems.extend(strays.into_iter().map(|stray| format!("{stray}: not in the manifest")));
    Ok(problems)
}

/// True when `manifest.json` of `job` is in place and certifies this job (its id and spec
/// fingerprint). Recovery checks this artefact, not the `finished` flag of state.json.
///
/// # Errors
/// [`Error::ObjectStore`] when it cannot be read (a missing or foreign manifest is `Ok(false)`).
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

/// Writes `manifest.json` from the markers of a finished job, then removes the job's staging
/// folder and local staging copies. A manifest in place for the same commits keeps its times.
///
/// # Errors
/// [`Error::MissingMarker`] when a class has no marker; [`Error::Commit`] for a marker that cannot
/// be used or a cleanup that fails; [`Error::ObjectStore`] when the manifest cannot be written.
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
            modes_bytes: Some(marker.modes.bytes),
            attempt_id: marker.attempt_id,
            quality: marker.quality,
            skipped_links: marker.skipped.link_examples,
            versions_changed: marker.versions_changed,
            latents_reused: marker.latent_cache_hit,
            modes_reused: marker.modes_cache_hit,
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
    // A manifest of this job already there (resumed, rebuilt, or forgotten and submitted again)
    // keeps the times it gives, which say when the job's work was done (the report's wall time
    // and rate come from them); when classes were distilled again since (a repair, accepted
    // data changes), that is recorded apart, as `repaired_unix_ms`.
    let key = out.key(&keys.manifest());
    let earlier = get_optional(out.store.as_ref(), &key)
        .await
        .ok()
        .flatten()
        .and_then(|bytes| serde_json::from_slice::<JobManifest>(&bytes).ok())
        .filter(|m| m.job_id == job.job_id && m.fingerprint == job.fingerprint);
    // Manifests of earlier versions do not give the modes' size: not a difference.
    let same_classes = |earlier: &[ManifestClass]| {
        earlier.len() == classes.len()
            && earlier.iter().zip(&classes).all(|(was, now)| {
                let mut was = was.clone();
                was.modes_bytes = was.modes_bytes.or(now.modes_bytes);
                was == *now
            })
    };
    let (created_unix_ms, finished_unix_ms, repaired_unix_ms) = match &earlier {
        Some(m) if same_classes(&m.classes) => (m.created_unix_ms, m.finished_unix_ms, m.repaired_unix_ms),
        Some(m) => (m.created_unix_ms, m.finished_unix_ms, Some(finished_unix_ms)),
        None => (job.created_unix_ms, finished_unix_ms, None),
    };
    let manifest = JobManifest {
        schema_version: SCHEMA_VERSION,
        job_id: job.job_id.clone(),
        fingerprint: job.fingerprint.clone(),
        spec: job.spec.clone(),
        model_fingerprints,
        classes: classes.clone(),
        images,
        timings,
        created_unix_ms,
        finished_unix_ms,
        repaired_unix_ms,
        reused: mgd3_common::manifest::Reused {
            latents: classes_reused(&classes, |c| c.latents_reused),
            modes: classes_reused(&classes, |c| c.modes_reused),
            cache: job.spec.latent_cache_url(),
        },
    };
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
        mgd3_common::commit::remove_staging_copies(out, &sheets, &format!("{wnid}.json#"), zero)?;
    }
    Ok(())
}

/// Classes of a manifest for which `reused` holds.
fn classes_reused(classes: &[ManifestClass], reused: impl Fn(&ManifestClass) -> bool) -> u64 {
    classes.iter().filter(|c| reused(c)).count() as u64
}
