//! Running a leased shard: the [`ShardEngine`] trait (the ONNX engine, or a fake one for fast
//! cluster tests and scale benchmarks) and [`run_shard`], which distils each class of the lease
//! and commits it with the create-only marker protocol. Runs on a blocking thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use image::{ImageFormat, RgbImage};
use mgd3_common::commit::{Check, ClassFiles, CommitOutcome, commit_class, committed_marker, publish};
use mgd3_common::job::{ClassRef, JobSpec};
use mgd3_common::layout::JobKeys;
use mgd3_common::manifest::{ClassMarker, FileDigest, SCHEMA_VERSION, StageSeconds};
use mgd3_common::seed::sample_seed;
use mgd3_common::store::Location;
use mgd3_onnx::SessionConfig;
use ndarray::Array2;
use object_store::ObjectStoreExt;
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use tokio::runtime::Handle;
use tracing::info;

use crate::cpu::CpuPool;
use crate::data::Dataset;
use crate::models::{ClassSpec, ClassTimings, EngineError, ModelPaths};
pub use crate::pipeline::{ClassResult, ClassSink};
use crate::pipeline::{Engine, ShardOptions, ShardStop};
use crate::sink::npy_bytes;

/// Why a shard attempt stopped. The cause is kept as a typed source; what the coordinator should
/// do about it is [`ShardFailure::disposition`].
#[derive(Debug, thiserror::Error)]
pub enum ShardFailure {
    /// Stopped on request: shutdown, a revoked lease, or a lease that ran out.
    #[error("worker stopped")]
    Cancelled,
    /// Distilling failed (data, models, sampling, output encoding).
    #[error(transparent)]
    Engine(Box<EngineError>),
    /// A model named by the job could not be fetched into the local cache.
    #[error("cannot fetch model `{url}`")]
    FetchModel {
        /// The model's path or URL as the job names it.
        url: String,
        /// Why it could not be fetched.
        #[source]
        source: mgd3_common::store::StoreError,
    },
    /// This worker cannot open the job's models (missing file, no CUDA, no ONNX Runtime).
    #[error("this worker cannot load the job's models")]
    ModelUnavailable(#[source] mgd3_onnx::Error),
    /// A model's files are not all here as the job needs them (external data missing, cut
    /// short, or outside the model's folder): another worker may have them.
    #[error("this worker cannot load model `{path}`")]
    ModelFiles {
        /// The model's path or URL as the job names it.
        path: String,
        /// What is wrong with its files here.
        #[source]
        source: mgd3_common::modelmeta::ModelFilesError,
    },
    /// The model file at the job's path has other bytes here than the job was submitted with.
    #[error("model `{path}` here has fingerprint {have}, the job expects {want}")]
    ModelMismatch {
        /// The model's path or URL as the job names it.
        path: String,
        /// The fingerprint of the file loaded here.
        have: String,
        /// The fingerprint the job was submitted with.
        want: String,
    },
    /// The job's dataset cannot be opened.
    #[error("cannot open the dataset")]
    Dataset(#[source] crate::data::DataError),
    /// The latent cache named by the job cannot be opened.
    #[error("cannot open the latent cache")]
    LatentCache(#[source] mgd3_common::store::StoreError),
    /// Committing a class failed (staging, marker, publishing).
    #[error(transparent)]
    Commit(#[from] mgd3_common::commit::CommitError),
    /// A class's modes could not be encoded as `.npy`.
    #[error("cannot encode the modes of the class")]
    EncodeModes(#[source] crate::sink::SinkError),
    /// The shard's bookkeeping lost a class (a bug or a store that forgets writes).
    #[error("{0}")]
    Lost(&'static str),
    /// A failure reported by an engine outside this crate (stand-in engines in tests and
    /// benchmarks), with its retryability.
    #[error("{message}")]
    Reported {
        /// What went wrong.
        message: String,
        /// Whether another attempt may succeed.
        retryable: bool,
    },
}

pub use mgd3_common::lease::Disposition;

impl ShardFailure {
    /// What the coordinator should do about this failure: a refusal of the output store that no
    /// retry fixes ([`mgd3_common::store::Refusal`]) pauses the job.
    pub fn disposition(&self) -> Disposition {
        use mgd3_common::commit::CommitError;
        match self {
            ShardFailure::Cancelled => Disposition::Release,
            ShardFailure::Engine(e) if matches!(**e, EngineError::Cancelled) => Disposition::Release,
            ShardFailure::ModelUnavailable(_)
            | ShardFailure::ModelMismatch { .. }
            | ShardFailure::ModelFiles { .. } => Disposition::Elsewhere,
            ShardFailure::Engine(e) if e.is_retryable() => Disposition::Retry,
            ShardFailure::Engine(_) | ShardFailure::Dataset(_) => Disposition::GiveUp,
            ShardFailure::Commit(CommitError::ForeignMarker { .. }) => Disposition::GiveUp,
            // A full, read-only or forbidden output: no attempt anywhere can commit until a
            // person acts.
            ShardFailure::Commit(CommitError::Store { source, .. })
                if mgd3_common::store::Refusal::of(source).is_some() =>
            {
                Disposition::Pause
            }
            ShardFailure::Reported { retryable: false, .. } => Disposition::GiveUp,
            ShardFailure::FetchModel { .. }
            | ShardFailure::LatentCache(_)
            | ShardFailure::Commit(_)
            | ShardFailure::EncodeModes(_)
            | ShardFailure::Lost(_)
            | ShardFailure::Reported { .. } => Disposition::Retry,
        }
    }

    /// The message and its causes on one line, as the coordinator records it.
    pub fn describe(&self) -> String {
        mgd3_common::error_chain(self)
    }
}

impl From<EngineError> for ShardFailure {
    fn from(error: EngineError) -> Self {
        match error {
            EngineError::Cancelled => ShardFailure::Cancelled,
            other => ShardFailure::Engine(Box::new(other)),
        }
    }
}

/// A failed shard attempt: the failure and the class it happened in, when it is about one.
#[derive(Debug, thiserror::Error)]
#[error("{failure}")]
pub struct ShardError {
    /// The class being distilled or committed, when the failure is about one class.
    pub class: Option<String>,
    /// What went wrong (boxed: errors travel through every commit call).
    #[source]
    pub failure: Box<ShardFailure>,
}

impl ShardError {
    /// A failure about no class in particular.
    pub fn shard(failure: impl Into<ShardFailure>) -> Self {
        ShardError { class: None, failure: Box::new(failure.into()) }
    }

    /// A failure about class `wnid`.
    pub fn class(wnid: &str, failure: impl Into<ShardFailure>) -> Self {
        ShardError { class: Some(wnid.to_owned()), failure: Box::new(failure.into()) }
    }
}

/// What a worker runs classes with.
pub trait ShardEngine: Send {
    /// Distils one class of `spec`. Stops early (returning `Cancelled`) once `cancel` is set.
    ///
    /// # Errors
    /// A [`ShardFailure`]: [`ShardFailure::Cancelled`], or what kept the class from being distilled.
    fn distill(
        &mut self,
        spec: &JobSpec,
        class: &ClassRef,
        cancel: &Arc<AtomicBool>,
    ) -> Result<ClassResult, ShardFailure>;

    /// Distils `classes` of `spec` in order, handing each to `sink` as soon as it is done.
    /// The default runs [`ShardEngine::distill`] class after class; engines that overlap stages
    /// or share model calls between classes override it.
    ///
    /// # Errors
    /// A [`ShardError`], naming the class when it is about one: a cancelled run, a class that
    /// failed, or a commit the sink refused.
    fn distill_shard(
        &mut self,
        spec: &JobSpec,
        classes: &[ClassRef],
        cancel: &Arc<AtomicBool>,
        sink: &mut dyn ClassSink<Error = ShardError>,
    ) -> Result<(), ShardError> {
        for class in classes {
            if cancel.load(Ordering::Relaxed) {
                return Err(ShardError::shard(ShardFailure::Cancelled));
            }
            let mut result = self.distill(spec, class, cancel).map_err(|f| ShardError::class(&class.wnid, f))?;
            let sheet = result.contact_sheet.take();
            if sink.commit(class, result)?
                && let Some(png) = sheet
            {
                sink.contact_sheet(class, png);
            }
        }
        Ok(())
    }

    /// Fingerprints of the models currently loaded, for registration: the path or URL as the job
    /// spec's `[models]` names it → `sha256:<hex>` of the file loaded from there. A handle
    /// readable without the engine: registration must never wait for a shard that holds the
    /// engine (a coordinator restarted mid-shard would see no poll and no renewal until it ends).
    /// The default is a snapshot of nothing loaded.
    fn loaded_models(&self) -> LoadedModels {
        LoadedModels::default()
    }
}

/// The fingerprints of the models an engine has loaded (the path or URL as the job spec names
/// it → `sha256:<hex>`), shared between the engine, which publishes them when it loads models,
/// and the client, which reads them to register.
#[derive(Clone, Debug, Default)]
pub struct LoadedModels(Arc<std::sync::RwLock<Vec<(String, String)>>>);

impl LoadedModels {
    /// A handle holding `fingerprints`.
    pub fn new(fingerprints: Vec<(String, String)>) -> Self {
        LoadedModels(Arc::new(std::sync::RwLock::new(fingerprints)))
    }

    /// The fingerprints now.
    pub fn get(&self) -> Vec<(String, String)> {
        self.0.read().expect("loaded models").clone()
    }

    /// Publishes the fingerprints of the models now loaded.
    pub fn set(&self, fingerprints: Vec<(String, String)>) {
        *self.0.write().expect("loaded models") = fingerprints;
    }
}

/// The engine of the last job, keyed by what it depends on.
struct LoadedEngine {
    /// Models, sampling settings, seed and latent cache, serialised.
    key: String,
    engine: Engine,
}

/// The real engine: loads the job's ONNX models once and reuses them for every class of the job.
pub struct OnnxShardEngine {
    session: SessionConfig,
    pool: CpuPool,
    /// The engine of the last job, keyed by what it depends on.
    loaded: Option<LoadedEngine>,
    /// The fingerprints of the models `loaded` holds, published for registration.
    published: LoadedModels,
}

impl OnnxShardEngine {
    /// Models run with `session`; decoding, preprocessing, k-means and PNG encoding on `pool`.
    pub fn new(session: SessionConfig, pool: CpuPool) -> Self {
        OnnxShardEngine { session, pool, loaded: None, published: LoadedModels::default() }
    }

    fn engine_for(&mut self, spec: &JobSpec) -> Result<&mut Engine, ShardFailure> {
        let key = serde_json::to_string(&(&spec.models, &spec.sampling, spec.seed, spec.latent_cache_url()))
            .expect("serialisable");
        if self.loaded.as_ref().is_none_or(|loaded| loaded.key != key) {
            self.loaded = None;
            self.published.set(Vec::new());
            // Local paths as they are; object-store URLs through the local model cache.
            let cache = mgd3_common::store::model_cache_dir();
            let local = |p: &str| {
                crate::data::block_on(mgd3_common::store::fetch_model(p, &cache))
                    .map_err(|source| ShardFailure::FetchModel { url: p.to_owned(), source })
            };
            let paths = ModelPaths {
                dit: local(&spec.models.dit)?,
                vae_encoder: local(&spec.models.vae_encoder)?,
                vae_decoder: local(&spec.models.vae_decoder)?,
            };
            // Every file each model loads, before ONNX Runtime tries (its error would read as a
            // failed run and spend the shard's attempts).
            for (named, path) in [
                (&spec.models.dit, &paths.dit),
                (&spec.models.vae_encoder, &paths.vae_encoder),
                (&spec.models.vae_decoder, &paths.vae_decoder),
            ] {
                match mgd3_common::modelmeta::model_files(path) {
                    Ok(_) => {}
                    // A model file that is not there is ONNX Runtime's ModelNotFound, below.
                    Err(mgd3_common::modelmeta::ModelFilesError::Io { path: file, .. }) if file == *path => {}
                    Err(source) => return Err(ShardFailure::ModelFiles { path: named.clone(), source }),
                }
            }

            let engine = match Engine::load(&paths, &self.session, spec.sampling, spec.seed) {
                Ok(engine) => engine,
                // A model this worker cannot open may be fine elsewhere (node-local paths).
                Err(EngineError::Model(
                    e @ (mgd3_onnx::Error::ModelNotFound(_)
                    | mgd3_onnx::Error::CudaUnavailable { .. }
                    | mgd3_onnx::Error::RuntimeUnavailable { .. }),
                )) => {
                    return Err(ShardFailure::ModelUnavailable(e));
                }
                Err(e) => return Err(e.into()),
            };
            let have = [
                (&spec.models.dit, &spec.models.dit_fingerprint, engine.models().fingerprints().dit.clone()),
                (
                    &spec.models.vae_encoder,
                    &spec.models.vae_encoder_fingerprint,
                    engine.models().fingerprints().vae_encoder.clone(),
                ),
                (
                    &spec.models.vae_decoder,
                    &spec.models.vae_decoder_fingerprint,
                    engine.models().fingerprints().vae_decoder.clone(),
                ),
            ];
            for (path, want, got) in &have {
                if let Some(want) = want
                    && *want != *got
                {
                    return Err(ShardFailure::ModelMismatch {
                        path: (*path).clone(),
                        have: got.clone(),
                        want: want.clone(),
                    });
                }
            }
            let fingerprints: Vec<(String, String)> =
                have.into_iter().map(|(path, _, got)| (path.clone(), got)).collect();
            let mut engine = engine;
            let cache = spec
                .latent_cache_url()
                .map(|url| mgd3_common::store::open(&url))
                .transpose()
                .map_err(ShardFailure::LatentCache)?;
            engine.set_latent_cache(cache);
            engine.set_cpu_pool(self.pool.clone());
            self.loaded = Some(LoadedEngine { key, engine });
            self.published.set(fingerprints);
        }
        Ok(&mut self.loaded.as_mut().expect("just loaded").engine)
    }
}

fn class_spec(spec: &JobSpec, class: &ClassRef) -> ClassSpec {
    ClassSpec::new(class.clone(), spec.ipc)
}

impl ShardEngine for OnnxShardEngine {
    fn distill(
        &mut self,
        spec: &JobSpec,
        class: &ClassRef,
        cancel: &Arc<AtomicBool>,
    ) -> Result<ClassResult, ShardFailure> {
        let engine = self.engine_for(spec)?;
        engine.set_cancel_flag(cancel.clone());
        let dataset = Dataset::open(&spec.dataset).map_err(ShardFailure::Dataset)?;
        Ok(engine.distill_class(&dataset, &class_spec(spec, class), spec.contact_sheet)?)
    }

    /// The pipelined shard: see [`crate::pipeline`].
    fn distill_shard(
        &mut self,
        spec: &JobSpec,
        classes: &[ClassRef],
        cancel: &Arc<AtomicBool>,
        sink: &mut dyn ClassSink<Error = ShardError>,
    ) -> Result<(), ShardError> {
        let engine = self.engine_for(spec).map_err(ShardError::shard)?;
        engine.set_cancel_flag(cancel.clone());
        let dataset = Dataset::open(&spec.dataset).map_err(|e| ShardError::shard(ShardFailure::Dataset(e)))?;
        let specs: Vec<ClassSpec> = classes.iter().map(|c| class_spec(spec, c)).collect();
        let options = ShardOptions { contact_sheet: spec.contact_sheet };
        match engine.distill_shard(&dataset, &specs, options, sink) {
            Ok(_) => Ok(()),
            Err(ShardStop::Sink(stop)) => Err(stop),
            Err(ShardStop::Engine { class, error }) => Err(ShardError { class, failure: Box::new((*error).into()) }),
        }
    }

    fn loaded_models(&self) -> LoadedModels {
        self.published.clone()
    }
}

/// A stand-in engine for cluster tests and scale benchmarks: takes `class_duration` per class and
/// produces small deterministic PNGs from each sample's seed, so runs are comparable byte for byte.
pub struct FakeEngine {
    /// How long each class takes.
    pub class_duration: Duration,
    /// What [`ShardEngine::loaded_models`] reports, as if these models were loaded.
    pub model_fingerprints: Vec<(String, String)>,
}

impl FakeEngine {
    /// An engine that takes `class_duration` per class and reports no loaded models.
    pub fn new(class_duration: Duration) -> Self {
        FakeEngine { class_duration, model_fingerprints: Vec::new() }
    }
}

impl ShardEngine for FakeEngine {
    fn distill(
        &mut self,
        spec: &JobSpec,
        class: &ClassRef,
        cancel: &Arc<AtomicBool>,
    ) -> Result<ClassResult, ShardFailure> {
        let deadline = Instant::now() + self.class_duration;
        while Instant::now() < deadline {
            if cancel.load(Ordering::Relaxed) {
                return Err(ShardFailure::Cancelled);
            }
            std::thread::sleep((deadline - Instant::now()).min(Duration::from_millis(10)));
        }
        let mut images = Vec::with_capacity(spec.ipc);
        let mut modes = Array2::<f32>::zeros((spec.ipc, 4));
        for j in 0..spec.ipc {
            let mut rng = Xoshiro256PlusPlus::seed_from_u64(sample_seed(spec.seed, class.class_index, j as u64));
            let img = RgbImage::from_fn(8, 8, |_, _| image::Rgb([rng.r#gen(), rng.r#gen(), (class.label % 256) as u8]));
            let mut bytes = std::io::Cursor::new(Vec::new());
            img.write_to(&mut bytes, ImageFormat::Png)
                .map_err(|e| ShardFailure::Reported { message: e.to_string(), retryable: true })?;
            images.push(bytes.into_inner());
            modes.row_mut(j).fill(j as f32);
        }
        let modes_npy = npy_bytes(&modes, std::path::Path::new("modes.npy")).map_err(ShardFailure::EncodeModes)?;
        Ok(ClassResult {
            files: ClassFiles { images, modes_npy },
            timings: ClassTimings {
                stages: StageSeconds { dit: self.class_duration.as_secs_f64(), ..Default::default() },
                ..Default::default()
            },
            contact_sheet: None,
            quality: None,
            embedding: None,
        })
    }

    fn loaded_models(&self) -> LoadedModels {
        LoadedModels::new(self.model_fingerprints.clone())
    }
}

/// The lease a shard runs under.
#[derive(Clone, Debug)]
pub struct ShardLease {
    /// The lease's id.
    pub lease_id: String,
    /// The attempt's id (in every marker this attempt writes).
    pub attempt_id: String,
    /// 1 for the first attempt at the shard, counting attempts that spent the budget.
    pub attempt: u32,
    /// The job's id.
    pub job_id: String,
    /// The job's fingerprint: markers of another fingerprint are refused.
    pub fingerprint: String,
    /// The job's spec.
    pub spec: Arc<JobSpec>,
    /// The shard's classes, in plan order.
    pub classes: Vec<ClassRef>,
    /// This worker's id.
    pub worker_id: String,
}

/// What a finished shard reports.
#[derive(Clone, Debug)]
pub struct ShardReport {
    /// Images in the shard's markers (all of its classes).
    pub images: u32,
    /// Seconds the shard took on this worker.
    pub seconds: f64,
    /// [`mgd3_common::commit::manifest_digest`] of the shard's markers.
    pub digest: String,
}

/// What a running shard has committed so far, read by the poll loop for its heartbeats.
#[derive(Debug, Default)]
pub struct ShardProgress {
    /// Images of committed classes.
    pub images: AtomicU32,
    /// Classes committed (by this attempt, or found committed by an earlier one).
    pub classes: AtomicU32,
}

/// Commits the classes an engine hands over, recording each class's marker.
struct Committer<'a> {
    runtime: &'a Handle,
    out: &'a Location,
    keys: JobKeys,
    lease: &'a ShardLease,
    progress: &'a ShardProgress,
    markers: std::collections::HashMap<String, ClassMarker>,
}

impl Committer<'_> {
    fn store_failure(wnid: &str, e: mgd3_common::commit::CommitError) -> ShardError {
        ShardError::class(wnid, e)
    }

    fn committed(&self, wnid: &str) -> Result<Option<ClassMarker>, ShardError> {
        self.runtime
            .block_on(committed_marker(self.out, &self.keys, wnid, &self.lease.fingerprint))
            .map_err(|e| Self::store_failure(wnid, e))
    }

    fn record(&mut self, marker: ClassMarker) {
        self.progress.images.fetch_add(marker.images.len() as u32, Ordering::Relaxed);
        if self.markers.insert(marker.wnid.clone(), marker).is_none() {
            self.progress.classes.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl ClassSink for Committer<'_> {
    type Error = ShardError;

    fn commit(&mut self, class: &ClassRef, result: ClassResult) -> Result<bool, ShardError> {
        let lease = self.lease;
        let span = tracing::info_span!("class", job = %lease.job_id, class = %class.wnid, worker = %lease.worker_id);
        let _guard = span.enter();
        let seconds = result.timings.total().as_secs_f64();
        let template = ClassMarker {
            schema_version: SCHEMA_VERSION,
            job_id: lease.job_id.clone(),
            fingerprint: lease.fingerprint.clone(),
            attempt_id: lease.attempt_id.clone(),
            worker_id: lease.worker_id.clone(),
            wnid: class.wnid.clone(),
            label: class.label,
            class_index: class.class_index,
            images: Vec::new(),
            modes: FileDigest { name: String::new(), sha256: String::new(), bytes: 0 },
            real_images: result.timings.real_images as u64,
            timings: result.timings.stages.clone(),
            committed_unix_ms: mgd3_common::now_ms(),
            latent_cache_hit: result.timings.latent_cache_hit,
            versions_changed: result.timings.versions_changed,
            skipped: result.timings.skipped,
            quality: result.quality,
            embedding: result.embedding,
        };
        let files = result.files;
        let (images, real_images) = (files.images.len(), template.real_images);
        let quality = template.quality.as_ref().map(|q| (q.diversity_normalised, q.representativeness_normalised));
        let outcome = self
            .runtime
            .block_on(commit_class(self.out, &self.keys, template, files))
            .map_err(|e| Self::store_failure(&class.wnid, e))?;
        let outcome_text = match outcome {
            CommitOutcome::Lost => "lost to another attempt",
            _ => "committed",
        };
        match quality {
            Some((diversity, representativeness)) => info!(
                images,
                real_images,
                seconds = format!("{seconds:.1}"),
                diversity = format!("{diversity:.3}"),
                representativeness = format!("{representativeness:.3}"),
                "class {outcome_text}"
            ),
            None => info!(images, real_images, seconds = format!("{seconds:.1}"), "class {outcome_text}"),
        }
        let marker = self.committed(&class.wnid)?.ok_or_else(|| {
            ShardError::class(&class.wnid, ShardFailure::Lost("the marker vanished after the commit"))
        })?;
        let won = outcome != CommitOutcome::Lost;
        if !won {
            info!(winner = %marker.attempt_id, "another attempt committed this class first");
        }
        self.record(marker);
        Ok(won)
    }

    fn contact_sheet(&mut self, class: &ClassRef, png: Vec<u8>) {
        let key = self.out.key(&self.keys.contact_sheet(&class.wnid));
        if let Err(error) = self.runtime.block_on(self.out.store.put(&key, png.into())) {
            tracing::warn!(class = %class.wnid, %key, %error, "could not write the contact sheet");
        }
    }
}

/// Distils and commits every class of the lease; classes committed by an earlier attempt are only
/// re-published, the others go to the engine together (one shard run, see
/// [`ShardEngine::distill_shard`]). Errors carry the class they happened in.
///
/// # Errors
/// A [`ShardError`]: [`ShardFailure::Cancelled`] once `cancel` is set; a failed commit or marker
/// read ([`ShardFailure::Commit`]); what the engine failed with; [`ShardFailure::Lost`] when a
/// class ends up without a marker.
pub fn run_shard(
    engine: &mut dyn ShardEngine,
    runtime: &Handle,
    out: &Location,
    lease: &ShardLease,
    progress: &ShardProgress,
    cancel: &Arc<AtomicBool>,
) -> Result<ShardReport, ShardError> {
    let started = Instant::now();
    let mut committer =
        Committer { runtime, out, keys: JobKeys::new(&lease.job_id), lease, progress, markers: Default::default() };
    let mut todo = Vec::new();
    for class in &lease.classes {
        if cancel.load(Ordering::Relaxed) {
            return Err(ShardError::shard(ShardFailure::Cancelled));
        }
        match committer.committed(&class.wnid)? {
            Some(marker) => {
                runtime
                    .block_on(publish(out, &committer.keys, &marker, Check::Size))
                    .map_err(|e| Committer::store_failure(&class.wnid, e))?;
                info!(job = %lease.job_id, class = %class.wnid, attempt = %marker.attempt_id, "class already committed");
                committer.record(marker);
            }
            None => todo.push(class.clone()),
        }
    }
    if !todo.is_empty() {
        engine.distill_shard(&lease.spec, &todo, cancel, &mut committer)?;
    }
    let mut markers = Vec::with_capacity(lease.classes.len());
    for class in &lease.classes {
        let marker = committer
            .markers
            .get(&class.wnid)
            .ok_or_else(|| ShardError::class(&class.wnid, ShardFailure::Lost("the engine skipped this class")))?;
        markers.push(marker);
    }
    Ok(ShardReport {
        images: markers.iter().map(|m| m.images.len() as u32).sum(),
        seconds: started.elapsed().as_secs_f64(),
        digest: mgd3_common::commit::manifest_digest(markers),
    })
}
