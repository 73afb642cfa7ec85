//! Submission: turning a job spec (TOML text) into a [`ResolvedJob`] — paths resolved against
//! the submitter's folder, the dataset listed and checked, the models' metadata checked against
//! the spec and their fingerprints filled in, shards planned, the job id derived. Runs before the
//! job touches the scheduler; `coordinator check` and `coordinator spec` use it without a
//! coordinator.

use std::path::Path;

use futures::{StreamExt, TryStreamExt};
use mgd3_common::batch::PlannedRows;
use mgd3_common::contract::{ContractViolation, DitInfo, ModelSet, ModelSetMismatch, VaeInfo};
use mgd3_common::imagecheck::MAX_IMAGE_BYTES;
use mgd3_common::imagefolder::{ClassListing, Root};
use mgd3_common::job::{
    ClassRef, ClassSelection, DataFingerprint, FieldError, JobError, JobSpec, LabelScheme, ModelSpec, ResolvedJob,
    job_id,
};
use mgd3_common::modelmeta::ModelFilesError;
use mgd3_common::now_ms;
use mgd3_common::store::{self};
use mgd3_common::sweep::{Sweep, SweepRecord, VariantRecord};
use tracing::debug;

use crate::error::{Error, Result};

/// A spec resolved at submit: the job, and what the look at its dataset found.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// The resolved job: paths, classes, model fingerprints, shards and job id.
    pub job: ResolvedJob,
    /// Images per class, in class order.
    pub image_counts: Vec<usize>,
    /// What a person should know about the dataset (skipped hidden folders, non-image entries).
    pub notes: Vec<String>,
    /// The DiT rows the shards were sized for, and where the number came from.
    pub planned: PlannedRows,
    /// The three model files as this host reads them (fetched into the model cache when the
    /// spec names an object store): what the models' metadata was checked from.
    pub local_models: ModelSpec,
}

/// Resolves a spec as submit does, without a coordinator: paths against `base_dir`, validation,
/// model fingerprints, the dataset listed and checked (see `check_dataset`), shards and the job
/// id. A job without `output` writes to `default_output`.
///
/// # Errors
/// Every problem of the spec or its dataset, as [`Error::Job`] where the user can fix it.
pub async fn resolve_spec(
    spec_toml: &str,
    base_dir: &Path,
    explicit_id: Option<String>,
    default_output: &str,
    allowed: Option<&[std::path::PathBuf]>,
    planned: PlannedRows,
) -> Result<Resolved> {
    resolve_job(JobSpec::from_toml(spec_toml)?, base_dir, explicit_id, default_output, allowed, planned).await
}

/// `problems` and then the problems of the spec's model files read from their metadata alone
/// ([`model_problems`], on a blocking thread): what a refused submit names in one go.
async fn with_model_problems(spec: &JobSpec, mut problems: Vec<FieldError>) -> Vec<FieldError> {
    let checked = spec.clone();
    problems
        .extend(tokio::task::spawn_blocking(move || model_problems(&checked, &[])).await.expect("model check task"));
    problems
}

/// [`resolve_spec`] of a spec already read.
///
/// # Errors
/// As [`resolve_spec`].
pub async fn resolve_job(
    mut spec: JobSpec,
    base_dir: &Path,
    explicit_id: Option<String>,
    default_output: &str,
    allowed: Option<&[std::path::PathBuf]>,
    planned: PlannedRows,
) -> Result<Resolved> {
    spec.resolve_paths(base_dir);
    // The settings' problems and what the model files are, in one go.
    match spec.validate() {
        Ok(()) => {}
        Err(JobError::Invalid(problems)) => {
            return Err(Error::Job(JobError::Invalid(with_model_problems(&spec, problems).await)));
        }
        Err(other) => return Err(other.into()),
    }
    let explicit_id = explicit_id.filter(|s| !s.is_empty());
    if let Some(id) = &explicit_id {
        mgd3_common::job::validate_job_id(id)?;
    }
    if let Some(allowed) = allowed {
        // Before anything is read, listed or created on behalf of the submitter.
        let mut checked = spec.clone();
        checked.output.get_or_insert_with(|| default_output.to_owned());
        checked.check_local_paths(allowed)?;
    }
    if spec.output.is_none() {
        spec.output = Some(default_output.to_owned());
    }
    // The dataset first: its problems are the user's to fix and cheaper to find than model
    // fingerprints of gigabytes. The models' own problems, read from their metadata alone, are
    // named beside the dataset's, so that one run names both.
    // An output, cache or state store inside the dataset is said with the dataset's and the
    // models' problems.
    let mut inside = spec.inside_dataset_problems_with(Some(default_output));
    inside.extend(folder_problems(&spec, Some(default_output), base_dir));
    let data = match check_dataset(&spec).await {
        Ok(data) if inside.is_empty() => data,
        Ok(_) => return Err(Error::Job(JobError::Invalid(with_model_problems(&spec, inside).await))),
        Err(Error::Job(JobError::Invalid(problems))) => {
            let problems = inside.into_iter().chain(problems).collect();
            return Err(Error::Job(JobError::Invalid(with_model_problems(&spec, problems).await)));
        }
        Err(other) => return Err(other),
    };
    // Models in an object store are fetched into the local model cache to be fingerprinted;
    // the spec keeps their URLs (workers fetch them the same way).
    let cache = store::model_cache_dir();
    let mut local = spec.models.clone();
    for path in [&mut local.dit, &mut local.vae_encoder, &mut local.vae_decoder] {
        *path = store::fetch_model(path, &cache).await?.display().to_string();
    }
    let urls = spec.models.clone();
    let classes = data.classes.clone();
    let local_models = local.clone();
    let mut spec = tokio::task::spawn_blocking(move || {
        let spec = JobSpec { models: local, ..spec };
        // Every model problem at once: what the files are, then whether they can be read and
        // match their fingerprints (a model already named is not named twice).
        let mut problems = model_problems(&spec, &classes);
        let (spec, unreadable) = fill_model_fingerprints(spec);
        for problem in unreadable {
            if !problems.iter().any(|named| problem.field.starts_with(named.field.as_str())) {
                problems.push(problem);
            }
        }
        if problems.is_empty() { Ok(spec) } else { Err(Error::Job(JobError::Invalid(problems))) }
    })
    .await
    .expect("fingerprint task")?;
    spec.models.dit = urls.dit;
    spec.models.vae_encoder = urls.vae_encoder;
    spec.models.vae_decoder = urls.vae_decoder;
    // The job's identity is its spec and classes; each class's data is recorded on its own
    // (`ClassRef::listing`) and compared class by class at resume and resubmit.
    let fingerprint = spec.fingerprint(&data.classes);
    let shards = spec.plan_shards_for(data.classes.len(), planned);
    let job_id = explicit_id.unwrap_or_else(|| job_id(&spec, &fingerprint));
    // The notes go back to whoever submitted (`check`, `run` and `submit` print them): logged at
    // DEBUG only, or a terminal shows each twice.
    for note in &data.notes {
        debug!(job = %job_id, "{note}");
    }
    let notes = data.notes;
    let job = ResolvedJob { job_id, spec, classes: data.classes, shards, fingerprint, created_unix_ms: now_ms() };
    Ok(Resolved { job, image_counts: data.image_counts, notes, planned, local_models })
}

/// `error` with each of its field problems said to be of variant `index` (from 0; told from 1,
/// with its settings); other errors as they are.
fn in_variant(error: Error, index: usize, variant: &mgd3_common::sweep::Variant) -> Error {
    match error {
        Error::Job(JobError::Invalid(problems)) => Error::Job(JobError::Invalid(
            problems
                .into_iter()
                .map(|p| FieldError {
                    field: p.field,
                    problem: format!("in variant {} ({}): {}", index + 1, variant.label(), p.problem),
                })
                .collect(),
        )),
        other => other,
    }
}

/// A sweep resolved at submit: every variant's job, and the sweep's record.
#[derive(Clone, Debug)]
pub struct ResolvedSweep {
    /// The variants, in the sweep's order.
    pub variants: Vec<Resolved>,
    /// The sweep's record (id, keys, each variant's job id, fingerprint and settings).
    pub record: SweepRecord,
    /// What a person should know (the dataset's notes once, the latent cache turned on).
    pub notes: Vec<String>,
}

/// Resolves every variant of a sweep as [`resolve_job`] would resolve it alone, reading the
/// dataset and fingerprinting the models once: the variant with the largest IPC is resolved in
/// full (so the "fewer images than IPC" check covers every variant), and the others take its
/// class list, listings and model fingerprints, with their own settings, checks against the
/// models' metadata, fingerprint, shards and id.
///
/// # Errors
/// As [`resolve_job`]; a model check that fails for one variant names it.
pub async fn resolve_sweep(
    sweep: &Sweep,
    base_dir: &Path,
    default_output: &str,
    allowed: Option<&[std::path::PathBuf]>,
    planned: PlannedRows,
) -> Result<ResolvedSweep> {
    let largest = (0..sweep.variants.len())
        .max_by_key(|&i| (sweep.variants[i].spec.ipc, usize::MAX - i))
        .expect("a sweep has variants");
    // Checked at the largest IPC with that variant's settings: a problem of IPC (a class with
    // fewer images) or of the sampling settings against the models names the variant.
    let variant_caused = |problems: &[FieldError]| {
        sweep.keys.contains(&mgd3_common::sweep::SweepKey::Ipc)
            || problems.iter().any(|p| p.field.starts_with("sampling."))
    };
    let full = resolve_job(sweep.variants[largest].spec.clone(), base_dir, None, default_output, allowed, planned)
        .await
        .map_err(|error| match error {
            Error::Job(JobError::Invalid(ref problems)) if variant_caused(problems) => {
                in_variant(error, largest, &sweep.variants[largest])
            }
            other => other,
        })?;
    let mut notes = full.notes.clone();
    if sweep.cache_turned_on {
        notes.push(format!(
            "the sweep caches real-image latents and k-means modes under {}/cache (`latent_cache = true`), so its {} variants encode and cluster each class once; set `latent_cache` to choose",
            full.job.spec.output.as_deref().unwrap_or(default_output).trim_end_matches('/'),
            sweep.variants.len()
        ));
    }
    // The model files as the full resolve fetched them: read, not fetched again.
    let local = full.local_models.clone();
    let mut variants = Vec::with_capacity(sweep.variants.len());
    for (i, variant) in sweep.variants.iter().enumerate() {
        if i == largest {
            variants.push(full.clone());
            continue;
        }
        let mut spec = variant.spec.clone();
        spec.resolve_paths(base_dir);
        spec.output = full.job.spec.output.clone();
        spec.models = full.job.spec.models.clone();
        let checked = JobSpec { models: local.clone(), ..spec.clone() };
        check_models(&checked, &full.job.classes).map_err(|error| in_variant(error, i, variant))?;
        let fingerprint = spec.fingerprint(&full.job.classes);
        let shards = spec.plan_shards_for(full.job.classes.len(), planned);
        let job_id = job_id(&spec, &fingerprint);
        let job = ResolvedJob {
            job_id,
            spec,
            classes: full.job.classes.clone(),
            shards,
            fingerprint,
            created_unix_ms: full.job.created_unix_ms,
        };
        let image_counts = full.image_counts.clone();
        variants.push(Resolved { job, image_counts, notes: Vec::new(), planned, local_models: local.clone() });
    }
    let fingerprints: Vec<String> = variants.iter().map(|v| v.job.fingerprint.clone()).collect();
    let record = SweepRecord {
        schema_version: mgd3_common::sweep::SWEEP_SCHEMA_VERSION,
        sweep_id: mgd3_common::sweep::sweep_id(sweep.name.as_deref(), &fingerprints),
        keys: sweep.keys.iter().map(|k| k.name().to_owned()).collect(),
        variants: sweep
            .variants
            .iter()
            .zip(&variants)
            .map(|(variant, resolved)| VariantRecord {
                job_id: resolved.job.job_id.clone(),
                fingerprint: resolved.job.fingerprint.clone(),
                settings: variant.settings.iter().map(|(k, v)| (k.name().to_owned(), v.clone())).collect(),
            })
            .collect(),
        output: full.job.spec.output.clone().unwrap_or_else(|| default_output.to_owned()),
        created_unix_ms: now_ms(),
    };
    Ok(ResolvedSweep { variants, record, notes })
}

/// How many classes' skipped links are told by name at submit and `check`.
const MAX_LINK_NOTES: usize = 20;

/// What the submit-time look at the dataset found.
pub(crate) struct DatasetCheck {
    pub(crate) classes: Vec<ClassRef>,
    /// Images per class, in class order.
    pub(crate) image_counts: Vec<usize>,
    /// What a person should know (hidden folders skipped, entries that are not images).
    pub(crate) notes: Vec<String>,
}

/// Images read at once while hashing a class's content.
const HASHES_IN_FLIGHT: usize = 32;

/// [`mgd3_common::imagefolder::content_digest`] of a listed class: every image read
/// ([`HASHES_IN_FLIGHT`] at a time) and hashed. Errors name the first image that cannot be read.
async fn content_digest(root: &Root, listing: &ClassListing) -> std::result::Result<String, String> {
    // Owned per read, so the stream is `Send` for the gRPC handlers that await it.
    let reads: Vec<_> = listing
        .images
        .iter()
        .map(|image| {
            let (root, image) = (root.clone(), image.clone());
            async move {
                let bytes = crate::decodecheck::read(&root, &image)
                    .await
                    .map_err(|problem| format!("image `{}` {problem}", image.display()))?;
                Ok::<_, String>(mgd3_common::sha256_hex(&bytes))
            }
        })
        .collect();
    let hashes = futures::stream::iter(reads).buffered(HASHES_IN_FLIGHT).try_collect::<Vec<_>>().await?;
    Ok(mgd3_common::imagefolder::content_digest(&listing.images, &hashes))
}

/// Classes without a folder named one by one, at most; more are counted.
const MISSING_SHOWN: usize = 10;

/// The dataset of `spec` and the classes it selects, when the dataset opens and the selection
/// resolves (whatever else is wrong with the classes): what `check --decode` decodes of a spec
/// refused for other problems.
pub(crate) async fn listable_classes(spec: &JobSpec) -> Option<(Root, Vec<ClassRef>)> {
    let root = Root::open(&spec.dataset).ok()?;
    let all = matches!(&spec.classes, ClassSelection::Named(all) if all == "all");
    let folders = if all || matches!(spec.labels, LabelScheme::Folder | LabelScheme::Position) {
        Some(root.list_classes().await.ok()?.0)
    } else {
        None
    };
    let classes = spec.class_list(|| Ok(folders.unwrap_or_default())).ok()?;
    Some((root, classes))
}

/// Lists the dataset by the one ImageFolder rule at submit: the class folders (for
/// `classes = "all"`) and every class's images. Every class that is missing or holds fewer than
/// IPC images is reported, all in one error, before any work is leased.
pub(crate) async fn check_dataset(spec: &JobSpec) -> Result<DatasetCheck> {
    let invalid = |problems: Vec<String>| {
        Error::Job(JobError::Invalid(
            problems.into_iter().map(|problem| FieldError { field: "dataset".into(), problem }).collect(),
        ))
    };
    let root = Root::open(&spec.dataset).map_err(|e| invalid(vec![mgd3_common::error_chain(&e)]))?;
    let mut notes = Vec::new();
    let all = matches!(&spec.classes, ClassSelection::Named(all) if all == "all");
    let folders = match &spec.classes {
        // Listed classes numbered by position: the root's folders only serve a note (whether
        // positions differ from folder indices), so a root that cannot be listed in full (a
        // broken link beside the classes) keeps no other problem from being said.
        _ if !all && spec.labels == LabelScheme::Position => match root.list_classes().await {
            Ok((names, _)) => Some(names),
            Err(_) => None,
        },
        _ if all || spec.labels == LabelScheme::Folder => {
            let (names, hidden) = root.list_classes().await.map_err(|e| invalid(vec![mgd3_common::error_chain(&e)]))?;
            if !hidden.is_empty() {
                notes.push(format!(
                    "skipped {} hidden folder(s) of `{}` (never a class): {}",
                    hidden.len(),
                    root.url(),
                    hidden.iter().map(|h| h.escape_debug().to_string()).collect::<Vec<_>>().join(", ")
                ));
            }
            Some(names)
        }
        _ => None,
    };
    let folder_names = folders.clone().unwrap_or_default();
    let folder_count = folder_names.len();
    let classes = spec.class_list(|| Ok(folders.unwrap_or_default()))?;
    // Only when it matters: some listed class's position is not its folder index.
    let mislabelled =
        classes.iter().any(|c| folder_names.iter().position(|f| *f == c.wnid).is_some_and(|i| i as i64 != c.label));
    if spec.labels == LabelScheme::Position && !all && classes.len() < folder_count && mislabelled {
        // The silent mislabel: a model trained on the whole ImageFolder numbers classes by folder.
        notes.push(format!(
            "labels = \"position\" numbers the {} listed classes 0..{}, but `{}` has {folder_count} class folders: a \
             DiT trained on the whole ImageFolder expects each class's folder index; use labels = \"folder\" for that",
            classes.len(),
            classes.len() - 1,
            root.url()
        ));
    }
    let lists: Vec<_> = classes
        .iter()
        .map(|class| {
            let (root, wnid) = (root.clone(), class.wnid.clone());
            async move { root.list_class(&wnid).await }
        })
        .collect();
    let listings = futures::StreamExt::buffered(futures::stream::iter(lists), 16);
    let listings: Vec<_> = futures::StreamExt::collect(listings).await;
    // `data_fingerprint = "content"`: every image read and hashed (a failed read is the class's
    // problem, named with the file).
    let mut content = Vec::with_capacity(listings.len());
    for listing in &listings {
        content.push(match (listing, spec.data_fingerprint) {
            (Ok(listing), DataFingerprint::Content) => Some(content_digest(&root, listing).await),
            _ => None,
        });
    }
    let (mut problems, mut counts) = (Vec::new(), Vec::new());
    let mut skipped = (0, 0);
    let mut links = Vec::new();
    let mut classes = classes;
    // Classes without a folder are summed up when there are many: a wrong dataset root would
    // otherwise be a thousand lines saying the same thing.
    let mut missing = Vec::new();
    // Missing folders with something close there (another letter case or Unicode form, a
    // file): named even when the missing are summed up, as that is the likelier cause.
    let mut near_misses: Vec<String> = Vec::new();
    let mut too_few = Vec::new();
    for ((class, listing), content) in classes.iter_mut().zip(listings).zip(content) {
        match listing {
            Err(error @ mgd3_common::imagefolder::ListError::ClassNotFound { .. }) => {
                let near = matches!(&error, mgd3_common::imagefolder::ListError::ClassNotFound { near: Some(_), .. });
                let said = mgd3_common::error_chain(&error);
                if near {
                    near_misses.push(said.clone());
                }
                missing.push((class.wnid.escape_debug().to_string(), said));
                counts.push(0);
            }
            Err(error) => {
                problems.push(mgd3_common::error_chain(&error));
                counts.push(0);
            }
            Ok(listing) => {
                if listing.images.len() < spec.ipc {
                    too_few.push(format!(
                        "class `{}`: {} image(s) but IPC = {} needs at least {}; add images or lower ipc",
                        class.wnid.escape_debug(),
                        listing.images.len(),
                        spec.ipc,
                        spec.ipc
                    ));
                }
                // A file no worker reads (the class would fail at every attempt), named now.
                let large: Vec<_> = listing.images.iter().filter(|i| i.bytes > MAX_IMAGE_BYTES).collect();
                if let Some(first) = large.first() {
                    problems.push(format!(
                        "class `{}`: {} file(s) larger than the {MAX_IMAGE_BYTES} bytes mgd3 reads for one image: `{}` \
                         ({} bytes){}; remove them from the class or convert them to a compressed image format",
                        class.wnid.escape_debug(),
                        large.len(),
                        first.display().escape_debug(),
                        first.bytes,
                        if large.len() > 1 { format!(" and {} more", large.len() - 1) } else { String::new() }
                    ));
                }
                skipped.0 += listing.skipped.hidden;
                skipped.1 += listing.skipped.not_images;
                if listing.skipped.links > 0 {
                    links.push(format!("class `{}`: {}", class.wnid.escape_debug(), listing.skipped.describe_links()));
                }
                counts.push(listing.images.len());
                let mut summary = listing.summary();
                match content {
                    Some(Ok(digest)) => summary.content_digest = Some(digest),
                    Some(Err(problem)) => problems.push(format!("class `{}`: {problem}", class.wnid.escape_debug())),
                    None => {}
                }
                class.listing = Some(summary);
            }
        }
    }
    // Missing folders first: a few named, many counted, all of them a wrong root.
    let missing_lines = match missing.len() {
        n if n == classes.len() && n > 1 => vec![format!(
            "none of the {n} classes has a folder in `{}` (first: `{}`): the dataset root is wrong, or not the ImageFolder's train/ folder",
            root.url(),
            missing[0].0
        )],
        n if n > MISSING_SHOWN => vec![format!(
            "{n} classes have no folder in `{}`: `{}` and {} more",
            root.url(),
            missing[..MISSING_SHOWN].iter().map(|(wnid, _)| wnid.as_str()).collect::<Vec<_>>().join("`, `"),
            n - MISSING_SHOWN
        )],
        _ => missing.into_iter().map(|(_, error)| error).collect(),
    };
    let mut missing_lines = missing_lines;
    if let Some(first) = near_misses.first()
        && !missing_lines.contains(first)
    {
        let more = near_misses.len() - 1;
        missing_lines.push(if more > 0 {
            format!("{first} (and {more} more class(es) with a folder of a close name)")
        } else {
            first.clone()
        });
    }
    problems.splice(0..0, missing_lines);
    // As for missing folders: a few named, many counted.
    if too_few.len() > MISSING_SHOWN {
        let fewest = counts.iter().copied().filter(|&n| n < spec.ipc).min().unwrap_or(0);
        problems.push(format!(
            "{} classes have fewer images than IPC = {} (the fewest: {fewest}), e.g. {}; add images or lower ipc",
            too_few.len(),
            spec.ipc,
            too_few[0]
        ));
    } else {
        problems.extend(too_few);
    }
    // The folders of a split (`train/`, `val/`) taken for classes: the root is one level too high.
    let splits = ["train", "val", "valid", "validation", "test"];
    if folder_count > 0 && folder_names.iter().all(|f| splits.contains(&f.to_ascii_lowercase().as_str())) {
        problems.push(format!(
            "the class folders of `{}` are {}: those are dataset splits, not classes; point `dataset` at the split to distil (e.g. `{}/{}`)",
            root.url(),
            folder_names.iter().map(|f| format!("`{f}`")).collect::<Vec<_>>().join(", "),
            root.url().trim_end_matches('/'),
            folder_names.iter().find(|f| f.eq_ignore_ascii_case("train")).unwrap_or(&folder_names[0])
        ));
    }
    problems.extend(same_folder_classes(&root, &classes));
    if !problems.is_empty() {
        return Err(invalid(problems));
    }
    if skipped != (0, 0) {
        notes.push(format!(
            "the class folders hold {} hidden and {} non-image entries, skipped (recorded in each class's marker)",
            skipped.0, skipped.1
        ));
    }
    // Links the walk would not follow (cycles, folders outside the class, second names of one
    // file), by name: each class counts its distinct files only.
    let more = links.len().saturating_sub(MAX_LINK_NOTES);
    notes.extend(links.into_iter().take(MAX_LINK_NOTES));
    if more > 0 {
        notes.push(format!("{more} more class(es) with skipped links (each class's marker lists them)"));
    }
    Ok(DatasetCheck { classes, image_counts: counts, notes })
}

/// Classes of a local dataset whose folders overlap: one folder under several names (links, bind
/// mounts: the same device and inode), or one class folder inside another (a link such as
/// `z -> a/sub`); each would take the others' images under another label. One problem per folder.
fn same_folder_classes(root: &Root, classes: &[ClassRef]) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let Root::Local(root) = root else { return Vec::new() };
    let mut folders: std::collections::BTreeMap<(u64, u64), (std::path::PathBuf, Vec<&str>)> = Default::default();
    for class in classes {
        let path = root.join(&class.wnid);
        if let (Ok(real), Ok(meta)) = (std::fs::canonicalize(&path), std::fs::metadata(&path)) {
            folders.entry((meta.dev(), meta.ino())).or_insert_with(|| (real, Vec::new())).1.push(&class.wnid);
        }
    }
    let names = |names: &[&str]| names.iter().map(|n| format!("`{}`", n.escape_debug())).collect::<Vec<_>>().join(", ");
    let mut problems: Vec<String> = folders
        .values()
        .filter(|(_, names)| names.len() > 1)
        .map(|(folder, same)| {
            format!(
                "classes {} are one folder (`{}`) through links or mounts: each would take the others' images under \
                 another label; keep one of them",
                names(same),
                folder.display()
            )
        })
        .collect();
    // Sorted by path, a folder's descendants come right after it: one pass, not all pairs (an
    // ImageNet-21K submit has 21,841 classes).
    let mut sorted: Vec<&(std::path::PathBuf, Vec<&str>)> = folders.values().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    for (i, (outer, outer_names)) in sorted.iter().map(|f| (&f.0, &f.1)).enumerate() {
        for (inner, inner_names) in
            sorted[i + 1..].iter().map(|f| (&f.0, &f.1)).take_while(|(p, _)| p.starts_with(outer))
        {
            problems.push(format!(
                "class {} (`{}`) holds the folder of class {} (`{}`): it would take that class's images; remove the \
                 link or the class",
                names(outer_names),
                outer.display(),
                names(inner_names),
                inner.display()
            ));
        }
    }
    problems
}

/// Checks what can be checked of the models at submit, from their metadata, inputs and outputs
/// (read without ONNX Runtime): each file against the model contract the workers check at load
/// ([`mgd3_common::contract`]), the three against each other, every class label inside the DiT's
/// classes, `sampling.cfg_channels` within the DiT's latent channels, DDIM `sampling.steps` the
/// DiT's timesteps can be respaced to. Every problem is reported at once, naming the setting as
/// the job spec spells it.
fn check_models(spec: &JobSpec, classes: &[ClassRef]) -> Result<()> {
    let problems = model_problems(spec, classes);
    if problems.is_empty() { Ok(()) } else { Err(Error::Job(JobError::Invalid(problems))) }
}

/// What `coordinator run` checks before it opens the store and starts its workers, so that a spec
/// that cannot run leaves nothing behind: the spec's own settings, what the model files it can
/// read are (the contract and the checks submit makes, without the dataset's labels), and, when every local worker runs on
/// the CPU (`cpu_workers`), models that ONNX Runtime runs on CUDA only (a bf16 export, a VAE's
/// CUDA graph: [`mgd3_common::contract::ModelIo::cuda_only`], the rule the workers apply). The
/// dataset and the fingerprints are checked at submit, once the workers have registered. An
/// output, latent cache or `store` (an absolute `--store` apart from the output) inside the
/// dataset is refused too.
///
/// # Errors
/// [`Error::Job`] with every problem, each naming its setting.
pub fn check_before_workers(spec: &JobSpec, base_dir: &Path, store: Option<&str>, cpu_workers: bool) -> Result<()> {
    let mut spec = spec.clone();
    spec.resolve_paths(base_dir);
    // The settings' problems and the models' in one go.
    let mut problems = match spec.validate() {
        Ok(()) => Vec::new(),
        Err(JobError::Invalid(problems)) => problems,
        Err(other) => return Err(other.into()),
    };
    problems.extend(spec.inside_dataset_problems_with(store));
    problems.extend(folder_problems(&spec, store, base_dir));
    problems.extend(model_problems(&spec, &[]));
    if cpu_workers {
        let m = &spec.models;
        for (field, path) in
            [("models.dit", &m.dit), ("models.vae_encoder", &m.vae_encoder), ("models.vae_decoder", &m.vae_decoder)]
        {
            let Ok(meta) = mgd3_common::modelmeta::read_model_meta(local_model(path)) else { continue };
            let what = match meta.cuda_only() {
                Some(mgd3_common::contract::CudaOnly::Bf16) => "a bf16 export".to_owned(),
                Some(mgd3_common::contract::CudaOnly::CudaGraph { group_norm: 0 }) => {
                    "the CUDA graph of a VAE".to_owned()
                }
                Some(mgd3_common::contract::CudaOnly::CudaGraph { group_norm }) => {
                    format!("the CUDA graph of a VAE ({group_norm} fused GroupNorms)")
                }
                None => continue,
            };
            problems.push(FieldError {
                field: field.into(),
                problem: format!(
                    "`{path}` is {what}, which ONNX Runtime runs on CUDA only (its CPU provider has no kernels \
                     for it), and the local workers run on the CPU: run with --device cuda (or --devices 0,1,...), \
                     or give fp32 or fp16 plain or fused exports (scripts/export_onnx.py)"
                ),
            });
        }
    }
    if problems.is_empty() { Ok(()) } else { Err(Error::Job(JobError::Invalid(problems))) }
}

/// Local folders the job writes (`output`, `latent_cache`, `--store`) whose path runs into a file
/// (the folder itself, or a folder above it, is a file): `run` failed on them after `check`
/// had passed. Where the path may still be created is for the run to find out.
fn folder_problems(spec: &JobSpec, store: Option<&str>, base_dir: &Path) -> Vec<FieldError> {
    let latent_cache = match &spec.latent_cache {
        Some(mgd3_common::job::LatentCache::At(at)) => Some(at.clone()),
        _ => None,
    };
    let store = store
        .map(|s| mgd3_common::store::resolve(s, &std::env::current_dir().unwrap_or_else(|_| base_dir.into())))
        .filter(|store| spec.output.as_ref() != Some(store));
    let mut problems = Vec::new();
    for (field, location) in [("output", spec.output.clone()), ("latent_cache", latent_cache), ("--store", store)] {
        let Some(location) = location else { continue };
        let local = location.strip_prefix("file://").unwrap_or(&location);
        if mgd3_common::store::is_url(local) || local.trim().is_empty() {
            continue;
        }
        let path = Path::new(local);
        // Inside a job's folder of another output (`<out>/jobs/<job>/…`, which holds the job's
        // records): that folder is the job's own, and its repairs remove what is not the job's.
        // Links are followed: a link into such a folder is the folder.
        if let Some(folder) = job_folder_around(path) {
            problems.push(FieldError {
                field: field.into(),
                problem: format!(
                    "`{location}` is inside `{}`, the folder of mgd3 job `{}` (its records, images and repairs are \
                     that job's alone: `resume` of it would remove what it does not know); name a folder outside it",
                    folder.display(),
                    folder.file_name().unwrap_or_default().to_string_lossy()
                ),
            });
            continue;
        }
        if let Some(file) = path.ancestors().find(|p| p.exists()).filter(|p| !p.is_dir()) {
            let what =
                if file == path { "is a file".to_owned() } else { format!("is under `{}`, a file", file.display()) };
            problems.push(FieldError {
                field: field.into(),
                problem: format!(
                    "`{location}` {what}, not a folder: name a folder (one that exists, or may be created)"
                ),
            });
        }
    }
    problems
}

/// The folder of an mgd3 job (`<out>/jobs/<job>`, holding the job's records) that `path` is in,
/// or is, links followed (a link into such a folder is the folder): a place that is the job's
/// alone, where nothing else may write (its repairs remove what the job does not know, and a file
/// in its `dataset/` becomes part of the distilled set).
pub(crate) fn job_folder_around(path: &Path) -> Option<std::path::PathBuf> {
    let real = through_links(path);
    real.ancestors()
        .find(|p| {
            p.parent().and_then(Path::file_name).is_some_and(|n| n == "jobs")
                && ["job.json", "shards", "manifest.json", "coordinator.json"].iter().any(|r| p.join(r).exists())
        })
        .map(Path::to_path_buf)
}

/// `path` with the links of its longest existing ancestor resolved, the rest as written.
fn through_links(path: &Path) -> std::path::PathBuf {
    for ancestor in path.ancestors() {
        if let Ok(real) = ancestor.canonicalize() {
            return real.join(path.strip_prefix(ancestor).unwrap_or(Path::new("")));
        }
    }
    path.to_path_buf()
}

/// A model setting's file on this machine: a path, or a `file://` URL's path.
fn local_model(path: &str) -> &Path {
    Path::new(path.strip_prefix("file://").unwrap_or(path))
}

/// What `coordinator check` says of each model of `spec`, one line per model (`dit`,
/// `vae_encoder`, `vae_decoder`): the file, what it declares (kind, classes and timesteps, image
/// and latent shapes, scale factor, precision, graph), its ONNX IR version and operator sets, and
/// where it runs (the CPU or CUDA, or CUDA only for a bf16 export or a CUDA-graph VAE). A model
/// given as a URL, or not readable here, is said to be checked where it is fetched or loaded.
/// The contract itself is `check_models`'s; these lines describe files that passed it.
pub fn model_lines(spec: &JobSpec) -> Vec<String> {
    let m = &spec.models;
    [("dit", &m.dit), ("vae_encoder", &m.vae_encoder), ("vae_decoder", &m.vae_decoder)]
        .into_iter()
        .map(|(kind, path)| format!("  {kind:<12} {path}: {}", describe_model(kind, path)))
        .collect()
}

fn describe_model(kind: &str, path: &str) -> String {
    if store::is_url(path) && !path.starts_with("file://") {
        return "a URL: fetched and checked by each worker (and fingerprinted at submit)".into();
    }
    let io = match mgd3_common::modelmeta::read_model_meta(local_model(path)) {
        Ok(io) => io,
        Err(error) => return format!("not readable here ({error}): the workers must find it at this path"),
    };
    let shape = |s: [usize; 3]| format!("{}×{}×{}", s[0], s[1], s[2]);
    // The export's own word (`bf16` computes inside an fp32 interface), else its inputs' type.
    let exported = io.metadata.get("mgd3.precision").map(|p| p.trim().to_owned());
    let precision = |p: mgd3_common::contract::Precision| {
        exported.clone().unwrap_or_else(|| match p {
            mgd3_common::contract::Precision::F32 => "fp32".into(),
            mgd3_common::contract::Precision::F16 => "fp16".into(),
        })
    };
    let declared = match kind {
        "dit" => DitInfo::from_io(&io).map(|d| {
            format!(
                "DiT, {} classes ({}), {} training timesteps, latents {}, {}, {}",
                d.num_classes,
                match io.label_tables.as_deref() {
                    Some([]) | None =>
                        "no class embedding found behind input `y`: labels are checked against the metadata only",
                    Some(_) => "its class embedding agrees",
                },
                d.train_timesteps,
                shape(d.latent_shape),
                precision(d.precision),
                io.graph()
            )
        }),
        "vae_encoder" => VaeInfo::encoder_from_io(&io).map(|v| {
            format!(
                "VAE encoder, images {} → latents {}, scale factor {}, {}",
                shape(v.image_shape),
                shape(v.latent_shape),
                v.scale_factor,
                precision(v.precision)
            )
        }),
        _ => VaeInfo::decoder_from_io(&io).map(|v| {
            format!(
                "VAE decoder, latents {} → images {}, scale factor {}, {}",
                shape(v.latent_shape),
                shape(v.image_shape),
                v.scale_factor,
                precision(v.precision)
            )
        }),
    };
    let mut text = declared.unwrap_or_else(|violation| violation.to_string());
    if let Some(ir) = io.ir_version {
        text.push_str(&format!("; ONNX IR {ir}"));
        if ir > mgd3_common::contract::REQUIRED_ORT_MAX_IR {
            text.push_str(&format!(
                " (newer than ONNX Runtime {} reads, IR {}: workers on it refuse the model)",
                mgd3_common::contract::REQUIRED_ORT,
                mgd3_common::contract::REQUIRED_ORT_MAX_IR
            ));
        }
    }
    let opsets: Vec<String> = io
        .opsets
        .iter()
        .map(|(domain, version)| match domain.as_str() {
            "" | "ai.onnx" if *version > mgd3_common::contract::REQUIRED_ORT_MAX_OPSET => format!(
                "opset {version} (newer than ONNX Runtime {} loads, opset {}: workers on it refuse the model)",
                mgd3_common::contract::REQUIRED_ORT,
                mgd3_common::contract::REQUIRED_ORT_MAX_OPSET
            ),
            "" | "ai.onnx" => format!("opset {version}"),
            domain => format!("{domain} {version}"),
        })
        .collect();
    if !opsets.is_empty() {
        text.push_str(&format!(", {}", opsets.join(", ")));
    }
    text.push_str(match io.cuda_only() {
        Some(mgd3_common::contract::CudaOnly::Bf16) => "; runs on CUDA only (bf16): its workers need `--device cuda`",
        Some(mgd3_common::contract::CudaOnly::CudaGraph { .. }) => {
            "; runs on CUDA only (the CUDA graph of the VAE): its workers need `--device cuda`"
        }
        None => "; runs on the CPU or CUDA",
    });
    text
}

/// [`check_models`]'s problems, each naming its setting.
fn model_problems(spec: &JobSpec, classes: &[ClassRef]) -> Vec<FieldError> {
    let m = &spec.models;
    // Each file's metadata is read once; the checks below look at what could be read.
    let [dit, encoder, decoder] =
        [&m.dit, &m.vae_encoder, &m.vae_decoder].map(|path| mgd3_common::modelmeta::read_model_meta(local_model(path)));
    let mut problems = Vec::new();
    // What each readable file declares, by the contract the workers check at load: a file that
    // does not fit is refused here, in the workers' words, before any GPU is spent on it.
    fn fits<T>(problems: &mut Vec<FieldError>, field: &str, result: Result<T, ContractViolation>) -> Option<T> {
        result
            .map_err(|violation| {
                problems.push(FieldError {
                    field: field.into(),
                    problem: if violation.found.contains("export_onnx.py") {
                        violation.to_string()
                    } else {
                        format!("{violation}; export it with scripts/export_onnx.py")
                    },
                })
            })
            .ok()
    }
    let (mut dit_info, mut encoder_info, mut decoder_info) = (None, None, None);
    for (field, path, kind, read) in [
        ("models.dit", &m.dit, "dit", &dit),
        ("models.vae_encoder", &m.vae_encoder, "vae_encoder", &encoder),
        ("models.vae_decoder", &m.vae_decoder, "vae_decoder", &decoder),
    ] {
        match read {
            Ok(meta) => {
                if let Some(found) = meta.metadata.get("mgd3.kind").map(|k| k.trim())
                    && found != kind
                {
                    problems.push(FieldError {
                        field: field.into(),
                        problem: format!(
                            "`{path}` is a {found} model (metadata `mgd3.kind`), not a {kind}; are two models swapped?"
                        ),
                    });
                    continue;
                }
                // ONNX Runtime would refuse it on every worker (an operator it has no schema for,
                // a name nothing defines), each one excluded from the job in turn.
                for violation in meta.graph_violations() {
                    problems.push(FieldError { field: field.into(), problem: violation.to_string() });
                }
                match kind {
                    "dit" => dit_info = fits(&mut problems, field, DitInfo::from_io(meta)),
                    "vae_encoder" => encoder_info = fits(&mut problems, field, VaeInfo::encoder_from_io(meta)),
                    _ => decoder_info = fits(&mut problems, field, VaeInfo::decoder_from_io(meta)),
                }
            }
            // A file that is here but is no model is the wrong file (a checkpoint, a folder, an
            // interrupted copy); a file that is not here may be one only the workers see, and is
            // left to the fingerprint check and the workers.
            Err(error) if mgd3_common::modelmeta::is_not_a_model(error) => problems.push(FieldError {
                field: field.into(),
                problem: format!("`{path}` is {error}{}", mgd3_common::modelmeta::not_a_model_advice(error)),
            }),
            Err(_) => {}
        }
    }
    if let Some(info) = &dit_info {
        {
            let n = info.num_classes as i64;
            let outside: Vec<String> = classes
                .iter()
                .filter_map(|c| mgd3_common::job::check_label(&c.wnid, c.label, n).err())
                .map(|o| format!("`{}` → {}", o.class.escape_debug(), o.label))
                .collect();
            if !outside.is_empty() {
                problems.push(FieldError {
                    field: "labels".into(),
                    problem: format!(
                        "{} class label(s) outside the DiT's {n} classes (models.dit metadata `mgd3.num_classes`): {}; \
                         use a DiT trained on these classes, or fewer classes",
                        outside.len(),
                        outside.iter().take(10).cloned().collect::<Vec<_>>().join(", ")
                    ),
                });
            }
        }
        if spec.sampling.steps > info.train_timesteps {
            problems.push(FieldError {
                field: "sampling.steps".into(),
                problem: format!(
                    "{} steps are more than the {} training timesteps of the DiT `{}` (metadata \
                     `mgd3.train_timesteps`): choose at most {}",
                    spec.sampling.steps, info.train_timesteps, m.dit, info.train_timesteps
                ),
            });
        } else if spec.sampling.sampler == mgd3_common::job::SamplerKind::Ddim
            && mgd3_common::job::ddim_stride(info.train_timesteps, spec.sampling.steps).is_none()
        {
            problems.push(FieldError {
                field: "sampling.steps".into(),
                problem: format!(
                    "DDIM cannot take {} evenly strided steps of the DiT's {} training timesteps (ADM's \
                     `ddim{}`); choose steps such as 10, 20, 25, 50, 100 or 250",
                    spec.sampling.steps, info.train_timesteps, spec.sampling.steps
                ),
            });
        }
        let channels = info.latent_shape[0];
        if spec.sampling.cfg_channels > channels {
            problems.push(FieldError {
                field: "sampling.cfg_channels".into(),
                problem: format!(
                    "{} exceeds the DiT's {channels} latent channels (input `x` of models.dit)",
                    spec.sampling.cfg_channels
                ),
            });
        }
    }
    if let (Some(dit), Some(encoder), Some(decoder)) = (&dit_info, &encoder_info, &decoder_info) {
        let set = ModelSet {
            dit: (local_model(&m.dit), dit),
            encoder: (local_model(&m.vae_encoder), encoder),
            decoder: (local_model(&m.vae_decoder), decoder),
        };
        for mismatch in set.mismatches() {
            let field = match mismatch {
                ModelSetMismatch::LatentShapes { half: "VAE encoder", .. } => "models.vae_encoder",
                _ => "models.vae_decoder",
            };
            problems.push(FieldError { field: field.into(), problem: mismatch.to_string() });
        }
    }
    problems
}

/// Computes missing model fingerprints from the files; a given fingerprint is checked when the
/// file is readable here. Returns the spec and every problem found, each naming its setting.
fn fill_model_fingerprints(mut spec: JobSpec) -> (JobSpec, Vec<FieldError>) {
    let mut problems = Vec::new();
    let m = &mut spec.models;
    for (field, path, expected) in [
        ("models.dit", &m.dit, &mut m.dit_fingerprint),
        ("models.vae_encoder", &m.vae_encoder, &mut m.vae_encoder_fingerprint),
        ("models.vae_decoder", &m.vae_decoder, &mut m.vae_decoder_fingerprint),
    ] {
        let mut invalid = |problem: String| problems.push(FieldError { field: field.to_owned(), problem });
        match mgd3_common::fingerprint_file(local_model(path)) {
            Ok(actual) => match expected {
                Some(want) if *want != actual => problems.push(FieldError {
                    field: format!("{field}_fingerprint"),
                    problem: format!("`{path}` has fingerprint {actual}, the spec expects {want}"),
                }),
                _ => *expected = Some(actual),
            },
            // A model whose external data the workers could not load (missing, cut short, a
            // folder, or outside its folder) is refused here, whatever fingerprint the spec gives.
            Err(error) if !matches!(error, ModelFilesError::Io { .. }) => invalid(mgd3_common::error_chain(&error)),
            // A model that cannot be read is the spec's problem, named by its field, with the
            // way out for a file that exists only where the workers run.
            Err(ModelFilesError::Io { path: file, source }) if expected.is_none() => {
                let fix = if source.kind() == std::io::ErrorKind::PermissionDenied {
                    "make it readable to the user this coordinator runs as (chmod a+r, or its group)".to_owned()
                } else if let Some(target) = mgd3_common::modelmeta::dangling_link(&file) {
                    format!(
                        "it is a link to `{}`, which does not exist: link or copy the model there",
                        target.display()
                    )
                } else {
                    "check the path (relative paths start at the job file's folder)".to_owned()
                };
                invalid(format!(
                    "`{}` cannot be read here ({source}): {fix}, or, if the file exists only where the workers \
                     run, give its `{field}_fingerprint = \"sha256:...\"`",
                    file.display()
                ));
            }
            Err(_) => {}
        }
    }
    (spec, problems)
}
