//! The shard-level engine: every class of a lease goes through overlapping stages, so that the
//! shard's wall time tracks its busiest stage rather than the sum of all of them.
//!
//! ```text
//!  data thread      list, read, decode + preprocess (CPU pool, in parallel), encode chunks ─┐
//!                                                          bounded queue (queue_depth) ◄──┘
//!  engine thread    VAE-encode each chunk ─► features ─► k-means thread (CPU pool) ─► modes
//!  (accelerator)    DiT calls of dit_rows / 2 samples, mixing classes ◄───────────────┘
//!                   a class whose IPC samples are done: VAE decode, PNG (CPU pool), commit,
//!                   then (only if this attempt's files won) its contact sheet
//! ```
//!
//! While class k is encoded and sampled, class k+1 is read and decoded. Samples are independent
//! of their batch mates (the sampler's noise is per sample and the DiT's rows do not interact),
//! so mixing classes in a call gives the bytes of sampling each class alone; the cluster tests
//! assert it.
//!
//! A class whose data or modes fail is set aside while the shard's other classes go on; the
//! shard then fails naming it (its retry redoes only the uncommitted classes).
//!
//! Sizes come from the worker's [`BatchPolicy`]: `encode_chunk`, `queue_depth`, `dit_rows` and
//! the VAE batches; every model call is further bounded by its element ceiling and
//! out-of-memory backoff (`mgd3_onnx`), which change no sample.
//!
//! Memory is bounded by the queue: at most `queue_depth + 2` chunks of decoded images
//! (64 × 3 × 256 × 256 f32 = 50 MB each at 256 px by default) plus, per class of the shard whose modes are
//! not found yet, its latents (n × 4 096 f32: 21 MB for 1 300 images).

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mgd3_common::batch::BatchPolicy;
use mgd3_common::job::SamplingSpec;
use mgd3_common::seed::kmeans_seed;
use mgd3_common::store::Location;
use ndarray::{Array4, ArrayView4, ArrayView5, Axis};
use rayon::prelude::*;
use tracing::{debug, info, warn};

use crate::cache;
use crate::cpu::CpuPool;
use crate::data::{self, DataError, Dataset, Pixels};
use crate::mgd3::modes::find_modes;
use crate::mgd3::noise::batch_noise;
use crate::mgd3::schedule::Schedule;
use crate::models::{
    ClassSpec, ClassTimings, EngineError, ModelPaths, Models, Runtime, SampleBatch, SampleInputs, check_guidance,
    sampler_of, schedule_for_sampler,
};
use crate::sink;
use mgd3_common::commit::ClassFiles;
use mgd3_common::job::ClassRef;

/// What a shard run makes besides its classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardOptions {
    /// Build each committed class's contact sheet (real images, decoded modes, samples).
    pub contact_sheet: bool,
}

/// One distilled class, ready to commit: its files as the commit protocol stores them, and
/// what its marker records about how they were made.
pub struct ClassResult {
    /// PNG bytes of sample j at index j, and the modes as `.npy` bytes (from the ONNX engine:
    /// `[IPC, C, h, w]` f32, scaled latent space).
    pub files: ClassFiles,
    /// Time per stage, real images used, latent-cache hit, what the listing left out.
    pub timings: ClassTimings,
    /// PNG of real images, decoded modes and samples side by side, from engines that make it
    /// before committing (the pipeline makes it after, only for classes its attempt won, and
    /// hands it to [`ClassSink::contact_sheet`]).
    pub contact_sheet: Option<Vec<u8>>,
    /// Diversity and representativeness, for the marker (engines with latents).
    pub quality: Option<mgd3_common::manifest::ClassQuality>,
    /// The class in latent space, for the marker and the job report.
    pub embedding: Option<mgd3_common::manifest::Embedding>,
}

/// Where every engine hands each distilled class of a shard, as soon as it is done: the
/// committer of a lease (`shard::run_shard`), or memory ([`Kept`]).
pub trait ClassSink {
    /// What a refused commit is.
    type Error;
    /// Commits `class`. `Ok(true)` when this attempt's files are the class's, `Ok(false)` when
    /// another attempt committed it first (no contact sheet is made then).
    ///
    /// # Errors
    /// What committing failed with; the shard stops with [`ShardStop::Sink`].
    fn commit(&mut self, class: &ClassRef, result: ClassResult) -> Result<bool, Self::Error>;
    /// Stores the contact sheet of a class whose commit returned `Ok(true)`.
    fn contact_sheet(&mut self, class: &ClassRef, png: Vec<u8>);
    /// Where the engine counts its DiT image-steps as it samples (one per image per step):
    /// progress inside a class, which the lease reports to the coordinator
    /// ([`mgd3_common::lease::RunningLease::image_steps_done`]). `None` (the default) when
    /// nobody reads it.
    fn image_steps(&self) -> Option<std::sync::Arc<AtomicU64>> {
        None
    }
}

/// A sink that keeps every class in memory, in the order they were done, and always wins:
/// `worker distill-class`, the benchmarks and tests.
#[derive(Default)]
pub struct Kept {
    /// Each class and what was made of it (its contact sheet in `contact_sheet`).
    pub classes: Vec<(ClassRef, ClassResult)>,
    /// DiT image-steps counted while sampling ([`ClassSink::image_steps`]).
    pub image_steps: std::sync::Arc<AtomicU64>,
}

impl ClassSink for Kept {
    type Error = std::convert::Infallible;

    fn commit(&mut self, class: &ClassRef, result: ClassResult) -> Result<bool, Self::Error> {
        self.classes.push((class.clone(), result));
        Ok(true)
    }

    fn contact_sheet(&mut self, class: &ClassRef, png: Vec<u8>) {
        if let Some((_, result)) = self.classes.iter_mut().rev().find(|(c, _)| c == class) {
            result.contact_sheet = Some(png);
        }
    }

    fn image_steps(&self) -> Option<std::sync::Arc<AtomicU64>> {
        Some(self.image_steps.clone())
    }
}

/// Why a shard run stopped.
#[derive(Debug)]
pub enum ShardStop<E> {
    /// The engine failed, in the named class when there is one.
    Engine {
        /// The class (wnid) it failed in, when it is about one.
        class: Option<String>,
        /// What failed.
        error: Box<EngineError>,
    },
    /// Committing a class failed.
    Sink(E),
}

impl<E> ShardStop<E> {
    fn class(class: &ClassSpec, error: impl Into<EngineError>) -> Self {
        ShardStop::Engine { class: Some(class.wnid.clone()), error: Box::new(error.into()) }
    }
}

/// Where a shard's time went, stage by stage (busy time of each stage; they overlap).
#[derive(Clone, Debug, Default)]
pub struct ShardStats {
    /// Wall-clock time of the whole shard run.
    pub wall: Duration,
    /// Listing, reading, decoding and preprocessing (data thread).
    pub data: Duration,
    /// VAE encoding.
    pub encode: Duration,
    /// k-means (k-means thread).
    pub kmeans: Duration,
    /// Sampling, wall-clock: DiT calls and guidance maths (two batches may be in flight).
    pub sample: Duration,
    /// Time inside DiT calls: `dit_busy / sample` is the DiT's busy share of sampling, which two
    /// batches in flight bring towards 1.
    pub dit_busy: Duration,
    /// DiT batches sampled alongside another (two in flight).
    pub paired_batches: usize,
    /// VAE decoding, PNG encoding and contact sheets.
    pub finish: Duration,
    /// Time inside the sink (commits).
    pub commit: Duration,
    /// Rows of every DiT call, in order.
    pub dit_rows: Vec<usize>,
    /// Per class, when its modes were known (since the shard started): the end of its data
    /// phase (list, read, decode, preprocess, encode, k-means).
    pub modes_ready: Vec<Option<Duration>>,
}

impl ShardStats {
    /// The longest of the stages' busy times.
    pub fn busiest_stage(&self) -> (&'static str, Duration) {
        [
            ("data", self.data),
            ("encode", self.encode),
            ("kmeans", self.kmeans),
            ("sample", self.sample),
            ("finish", self.finish),
            ("commit", self.commit),
        ]
        .into_iter()
        .max_by_key(|(_, d)| *d)
        .expect("stages")
    }
}

/// What the data and k-means threads send the engine thread.
enum Event {
    /// Preprocessed images `[b, c, S, S]` of class `slot`; `last` closes the class.
    /// `cache`: where the class's latents go once complete and what they are computed from
    /// (last chunk, cache on).
    Chunk {
        slot: usize,
        batch: Array4<f32>,
        /// The chunk's images, as paths or keys, to name one the VAE fails on.
        names: Vec<String>,
        crops: Vec<Pixels>,
        images: usize,
        last: bool,
        seconds: Duration,
        cache: Option<(String, cache::Source)>,
    },
    /// The class's latents came from the latent cache (at `key`), computed from files of
    /// content digest `content`.
    Cached {
        slot: usize,
        key: String,
        content: String,
        features: Vec<f32>,
        /// The class's images in the order of `features`.
        names: Vec<String>,
        crops: Vec<Pixels>,
        images: usize,
        seconds: Duration,
    },
    /// The listing left entries out.
    Skipped {
        slot: usize,
        skipped: mgd3_common::imagefolder::Skipped,
        versions_changed: bool,
    },
    /// The class's modes, and its real latents back (`[n, C·h·w]` flattened) for the quality
    /// numbers once its samples are done.
    Modes {
        slot: usize,
        modes: Array4<f32>,
        real: Vec<f32>,
        seconds: Duration,
        /// The modes came from the latent cache.
        cached: bool,
    },
    Failed {
        slot: usize,
        error: EngineError,
    },
}

/// A class's latents on their way to the k-means thread: `count` rows of `features`, the real
/// images they are of (to name identical ones), and where they are cached (the modes are cached
/// beside them).
struct ToKmeans {
    slot: usize,
    features: Vec<f32>,
    count: usize,
    names: Vec<String>,
    /// The latents' cache key and the content digest of their files (cache on).
    cache: Option<(String, String)>,
}

/// A chunk of a class's real images, read and preprocessed (`Engine::decode_chunk`).
struct DecodedChunk {
    /// `[b, c, S, S]`.
    batch: Array4<f32>,
    /// The crops kept for the contact sheet.
    crops: Vec<Pixels>,
    /// Each file's `sha256:<hex>`, in the chunk's order (empty unless asked for).
    hashes: Vec<String>,
}

/// A class in flight on the engine thread.
#[derive(Default)]
struct InFlight {
    features: Vec<f32>,
    /// The real images of `features`' rows (paths or keys).
    names: Vec<String>,
    crops: Vec<Pixels>,
    timings: ClassTimings,
    modes: Option<Array4<f32>>,
    /// Modes were found (they stay set after `modes` is taken).
    has_modes: bool,
    latents: Option<Array4<f32>>,
    sampled: usize,
    /// The real latents the modes came from (flattened rows), kept for the quality numbers.
    real: Vec<f32>,
}

/// A shard run's engine: the [`Models`] with what a run of the job adds — the schedule of its
/// sampling settings, its seed, the batch policy, the cancel flag, the latent
/// cache and the CPU pool. [`Engine::distill_shard`] runs the overlapping stages.
pub struct Engine {
    models: Models,
    schedule: Schedule,
    /// The job's sampling settings (steps, λ, t_stop, CFG, sampler).
    sampling: SamplingSpec,
    /// The job's seed: each sample's noise stream derives from it, the class index and the
    /// sample index.
    seed: u64,
    /// Items per call of each model and the data stage's chunks.
    policy: BatchPolicy,
    /// Two DiT batches in flight when two are ready ([`crate::models::Runtime::overlap`]).
    overlap: bool,
    /// Set to stop the running class after its current batch.
    cancel: Arc<AtomicBool>,
    /// Stops sampling before its next DiT call once set (a revoked lease).
    stop_now: Option<Arc<AtomicBool>>,
    /// Where per-class VAE latents are cached, if anywhere.
    latent_cache: Option<Location>,
    /// Decoding, preprocessing, k-means and PNG encoding run here.
    pool: CpuPool,
}

impl Engine {
    /// Loads the three models ([`Models::load`]) and checks them against `sampling`; calls and
    /// chunks follow `runtime.policy`.
    ///
    /// # Errors
    /// Those of [`Models::load`]; [`EngineError::Schedule`] and [`EngineError::Invalid`] for
    /// sampling settings the models rule out.
    pub fn load(paths: &ModelPaths, runtime: &Runtime, sampling: SamplingSpec, seed: u64) -> Result<Self, EngineError> {
        let models = Models::load(paths, runtime)?;
        let schedule = schedule_for_sampler(models.dit(), sampling.steps, sampler_of(&sampling))?;
        check_guidance(&sampling, models.dit().info().latent_shape[0])?;
        let mut policy = runtime.policy;
        if runtime.auto_rows.is_some() {
            // chosen at load from the free memory
            policy.dit_rows = models.dit().call_limit().policy;
        }
        Ok(Engine {
            models,
            schedule,
            sampling,
            seed,
            policy,
            overlap: runtime.overlap,
            cancel: Arc::new(AtomicBool::new(false)),
            stop_now: None,
            latent_cache: None,
            pool: CpuPool::default(),
        })
    }

    /// The models.
    pub fn models(&self) -> &Models {
        &self.models
    }

    /// Uses `flag` to stop a running class after its current batch (shutdown, revoked lease).
    pub fn set_cancel_flag(&mut self, flag: Arc<AtomicBool>) {
        self.cancel = flag;
    }

    /// Sets (or clears) the flag that stops sampling before its next DiT call (a revoked lease:
    /// see [`crate::engines::ShardEngine::set_stop_now`]); the shard then ends `Cancelled`.
    pub fn set_stop_now(&mut self, flag: Option<Arc<AtomicBool>>) {
        self.stop_now = flag;
    }

    /// Caches (and reuses) per-class latents under `cache`.
    pub fn set_latent_cache(&mut self, cache: Option<Location>) {
        self.latent_cache = cache;
    }

    /// Runs the CPU stages on `pool` (default: a pool of every available CPU).
    pub fn set_cpu_pool(&mut self, pool: CpuPool) {
        self.pool = pool;
    }

    /// Samples per DiT call (each a cond+uncond pair): half the policy's DiT rows, or fewer
    /// when the DiT's element ceiling or out-of-memory backoff allows fewer rows.
    pub fn samples_per_call(&self) -> usize {
        self.policy.samples_per_call().min(mgd3_common::batch::samples_per_call(self.models.dit().call_limit().items))
    }

    /// The batch policy the engine was loaded with.
    pub fn policy(&self) -> &BatchPolicy {
        &self.policy
    }

    /// Samples with explicit modes and noise (`[n, C, h, w]` and `[n, S+1, C, h, w]`, f32, scaled
    /// latent space) in DiT calls of [`Engine::samples_per_call`]; returns x₀ `[n, C, h, w]`.
    ///
    /// # Errors
    /// As [`crate::models::sample_in_batches`].
    pub fn sample_latents(
        &mut self,
        class: &str,
        labels: &[i64],
        modes: ArrayView4<f32>,
        noise: ArrayView5<f32>,
        timings: &mut ClassTimings,
    ) -> Result<Array4<f32>, EngineError> {
        let batch = SampleBatch {
            class,
            labels,
            modes,
            noise,
            samples_per_call: self.samples_per_call(),
            cancel: Some(&self.cancel),
            sampler: sampler_of(&self.sampling),
        };
        self.models.sample_in_batches(&self.schedule, &self.sampling, batch, timings)
    }

    /// The per-sample noise of a class: `[IPC, S+1, C, h, w]`, from the one noise generator a
    /// shard uses ([`batch_noise`]).
    pub fn class_noise(&self, class: &ClassSpec) -> ndarray::Array5<f32> {
        let samples: Vec<(u64, u64)> = (0..class.ipc as u64).map(|j| (class.class_index, j)).collect();
        let shape = self.models.dit().info().latent_shape;
        self.pool.install(|| batch_noise(self.seed, &samples, self.schedule.steps(), shape))
    }

    /// Distils `classes` (in order) through the overlapping stages described in the module
    /// docs, handing each class to `outputs` as soon as its samples are done. Every DiT call but
    /// the shard's last carries [`Engine::samples_per_call`] samples when the shard has
    /// that many.
    ///
    /// # Errors
    /// The first failure of any stage, with the class it happened in; classes handed to
    /// `outputs` before stay committed. `Cancelled` once the cancel flag is set.
    pub fn distill_shard<S: ClassSink + ?Sized>(
        &mut self,
        dataset: &Dataset,
        classes: &[ClassSpec],
        options: ShardOptions,
        sink: &mut S,
    ) -> Result<ShardStats, ShardStop<S::Error>> {
        let started = Instant::now();
        for class in classes {
            self.check_class(class).map_err(|error| ShardStop::class(class, error))?;
        }
        self.models.reset_backoff();
        let (events_tx, events_rx) = mpsc::sync_channel::<Event>(self.policy.queue_depth.max(1));
        let (kmeans_tx, kmeans_rx) = mpsc::channel::<ToKmeans>();
        let stop = AtomicBool::new(false);
        let result = std::thread::scope(|scope| {
            let data_events = events_tx.clone();
            let stop = &stop;
            let data_stage = DataStage {
                dataset: dataset.clone(),
                classes,
                image_shape: self.models.encoder().info().image_shape,
                latent_dim: self.models.encoder().info().latent_shape.iter().product(),
                encode_chunk: self.policy.encode_chunk,
                vae_fingerprint: self.models.fingerprints().vae_encoder.clone(),
                latent_cache: self.latent_cache.clone(),
                pool: self.pool.clone(),
                keep_crops: options.contact_sheet,
                runtime: tokio::runtime::Handle::try_current().ok(),
            };
            let cancel = self.cancel.clone();
            std::thread::Builder::new()
                .name("mgd3-data".into())
                .spawn_scoped(scope, move || {
                    data_stage.run(&data_events, || stop.load(Ordering::Relaxed) || cancel.load(Ordering::Relaxed))
                })
                .expect("starting the data thread");
            let (pool, seed, shape) = (self.pool.clone(), self.seed, self.models.dit().info().latent_shape);
            let cache = self.latent_cache.clone();
            let kmeans_events = events_tx;
            std::thread::Builder::new()
                .name("mgd3-kmeans".into())
                .spawn_scoped(scope, move || {
                    for ToKmeans { slot, features, count, names, cache: source } in kmeans_rx {
                        let class = &classes[slot];
                        let started = Instant::now();
                        let dim = shape.iter().product();
                        let class_seed = kmeans_seed(seed, class.class_index);
                        // Modes another job found from the same cached latents, IPC and seed
                        // (a sweep's other variant) are the modes k-means would find here.
                        let modes_key = cache.as_ref().zip(source.as_ref()).map(|(cache, (key, content))| {
                            (cache, cache::modes_key(key, content, class.ipc, class_seed))
                        });
                        let hit = modes_key.as_ref().and_then(|(cache, key)| {
                            match cache::load(cache, key, class.ipc, dim) {
                                Ok(found) => found.map(|entry| entry.values),
                                Err(error) => {
                                    warn!(class = %class.wnid, error = %mgd3_common::error_chain(&error), "cached modes unreadable; running k-means");
                                    None
                                }
                            }
                        });
                        let cached = hit.is_some();
                        let found = match hit {
                            Some(modes) => {
                                info!(class = %class.wnid, "modes cache hit: skipping k-means");
                                Ok(modes)
                            }
                            None => pool.install(|| find_modes(&features, count, dim, class.ipc, class_seed)),
                        };
                        if let (false, Ok(modes), Some((cache, key))) = (cached, &found, &modes_key) {
                            // A lost cache write costs the next variant a k-means run, nothing else.
                            if let Err(error) = cache::store(cache, key, modes, class.ipc, dim, None) {
                                warn!(class = %class.wnid, error = %mgd3_common::error_chain(&error), "modes not cached");
                            }
                        }
                        let event = match found {
                            Ok(centroids) => Event::Modes {
                                slot,
                                modes: Array4::from_shape_vec((class.ipc, shape[0], shape[1], shape[2]), centroids)
                                    .expect("k × dim centroids"),
                                real: features,
                                seconds: started.elapsed(),
                                cached,
                            },
                            Err(source) => {
                                Event::Failed {
                                    slot,
                                    error: EngineError::Modes { class: class.wnid.clone(), images: names, source },
                                }
                            }
                        };
                        if kmeans_events.send(event).is_err() {
                            return;
                        }
                    }
                })
                .expect("starting the k-means thread");
            let result = self.run_engine_stage(classes, options, events_rx, kmeans_tx, sink, started);
            // Unblocks and ends the other stages on an early return.
            stop.store(true, Ordering::Relaxed);
            result
        });
        let mut stats = result?;
        stats.wall = started.elapsed();
        debug!(
            classes = classes.len(),
            wall = stats.wall.as_secs_f64(),
            data = stats.data.as_secs_f64(),
            encode = stats.encode.as_secs_f64(),
            kmeans = stats.kmeans.as_secs_f64(),
            sample = stats.sample.as_secs_f64(),
            dit_busy_share = stats.dit_busy.as_secs_f64() / stats.sample.as_secs_f64().max(1e-9),
            finish = stats.finish.as_secs_f64(),
            commit = stats.commit.as_secs_f64(),
            dit_calls = stats.dit_rows.len(),
            "shard stages"
        );
        Ok(stats)
    }

    /// Distils one class of an ImageFolder: a shard of one class, kept in memory.
    ///
    /// # Errors
    /// Those of [`Engine::distill_shard`].
    pub fn distill_class(
        &mut self,
        dataset: &Dataset,
        class: &ClassSpec,
        contact_sheet: bool,
    ) -> Result<ClassResult, EngineError> {
        let mut kept = Kept::default();
        match self.distill_shard(dataset, std::slice::from_ref(class), ShardOptions { contact_sheet }, &mut kept) {
            Ok(_) => Ok(kept.classes.pop().expect("the one class is done").1),
            Err(ShardStop::Engine { error, .. }) => Err(*error),
            Err(ShardStop::Sink(never)) => match never {},
        }
    }

    fn check_class(&self, class: &ClassSpec) -> Result<(), EngineError> {
        if class.ipc == 0 {
            return Err(EngineError::Invalid(mgd3_common::job::InvalidSetting {
                setting: mgd3_common::job::Setting::Ipc,
                origin: mgd3_common::job::SettingSource::JobSpec,
                value: "0".into(),
                problem: format!("class `{}` needs at least one image", class.wnid),
            }));
        }
        mgd3_common::job::check_label(&class.wnid, class.label, self.models.dit().info().num_classes as i64)?;
        Ok(())
    }

    /// The engine thread: encodes chunks as they come, samples whenever a full DiT call is
    /// ready (or nothing else will come), finishes and hands over classes.
    fn run_engine_stage<S: ClassSink + ?Sized>(
        &mut self,
        classes: &[ClassSpec],
        options: ShardOptions,
        events: mpsc::Receiver<Event>,
        kmeans: mpsc::Sender<ToKmeans>,
        sink: &mut S,
        started: Instant,
    ) -> Result<ShardStats, ShardStop<S::Error>> {
        let mut stats = ShardStats { modes_ready: vec![None; classes.len()], ..Default::default() };
        let mut flight: Vec<InFlight> = classes.iter().map(|_| InFlight::default()).collect();
        let mut ready: VecDeque<(usize, usize)> = VecDeque::new();
        // A class that fails (its data, its modes) is set aside and the others go on, so that one
        // bad class loses nothing else; the shard then fails naming the first failed class, and its
        // retry redoes only the classes that are not committed.
        let mut failed: std::collections::BTreeMap<usize, EngineError> = Default::default();
        let per_call = self.samples_per_call();
        let image_steps = sink.image_steps().unwrap_or_default();
        loop {
            // Everything already waiting first, so that the CPU stages never wait on sampling.
            while let Ok(event) = events.try_recv() {
                self.handle(event, classes, &mut flight, &mut ready, &mut failed, &kmeans, &mut stats, started)?;
            }
            if self.cancel.load(Ordering::Relaxed) {
                return Err(ShardStop::Engine { class: None, error: Box::new(EngineError::Cancelled) });
            }
            ready.retain(|(slot, _)| !failed.contains_key(slot));
            let resolved = (0..classes.len()).all(|slot| flight[slot].has_modes || failed.contains_key(&slot));
            if ready.len() >= per_call || (resolved && !ready.is_empty()) {
                // Two full DiT batches in flight when two are ready (each exactly the batch it
                // would be alone, so the bytes do not change); else one, as many as are ready.
                let groups = if self.overlap && ready.len() >= 2 * per_call { 2 } else { 1 };
                let batches: Vec<Vec<(usize, usize)>> =
                    (0..groups).map(|_| ready.drain(..per_call.min(ready.len())).collect()).collect();
                for slot in self.sample_batches(classes, &mut flight, &batches, &image_steps, &mut stats)? {
                    self.finish_class(classes, &mut flight[slot], slot, options, sink, &mut stats)?;
                }
                continue;
            }
            if resolved {
                return match failed.into_iter().next() {
                    None => Ok(stats),
                    Some((slot, error)) => Err(ShardStop::class(&classes[slot], error)),
                };
            }
            // Waits for the other stages, looking at the cancel flag a few times a second.
            match events.recv_timeout(Duration::from_millis(200)) {
                Ok(event) => {
                    self.handle(event, classes, &mut flight, &mut ready, &mut failed, &kmeans, &mut stats, started)?
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // The other stages end early only when cancelled.
                    return Err(ShardStop::Engine { class: None, error: Box::new(EngineError::Cancelled) });
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn handle<E>(
        &mut self,
        event: Event,
        classes: &[ClassSpec],
        flight: &mut [InFlight],
        ready: &mut VecDeque<(usize, usize)>,
        failed: &mut std::collections::BTreeMap<usize, EngineError>,
        kmeans: &mpsc::Sender<ToKmeans>,
        stats: &mut ShardStats,
        started: Instant,
    ) -> Result<(), ShardStop<E>> {
        match event {
            Event::Chunk { slot, batch, names, crops, images, last, seconds, cache: to_cache } => {
                let class = &classes[slot];
                let state = &mut flight[slot];
                state.timings.stages.decode += seconds.as_secs_f64();
                stats.data += seconds;
                state.crops.extend(crops);
                let started = Instant::now();
                let latents = self
                    .models
                    .encode(&class.wnid, batch.view(), |i| {
                        format!("real image `{}`", names.get(i).map_or("?", String::as_str).escape_debug())
                    })
                    .map_err(|e| ShardStop::class(class, e))?;
                drop(batch);
                state.features.extend(latents.iter().copied());
                state.names.extend(names);
                let spent = started.elapsed();
                state.timings.stages.encode += spent.as_secs_f64();
                stats.encode += spent;
                if last {
                    state.timings.real_images = images;
                    if let (Some(cache), Some((key, source))) = (self.latent_cache.as_ref(), &to_cache) {
                        let dim = self.models.encoder().info().latent_shape.iter().product();
                        cache::store(cache, key, &state.features, images, dim, Some(source))
                            .map_err(|e| ShardStop::class(class, e))?;
                        info!(class = %class.wnid, key = %key, "latents cached");
                    }
                    let features = std::mem::take(&mut state.features);
                    let names = std::mem::take(&mut state.names);
                    let cache = to_cache.map(|(key, source)| (key, source.content));
                    let _ = kmeans.send(ToKmeans { slot, features, count: images, names, cache });
                }
            }
            Event::Cached { slot, key, content, features, names, crops, images, seconds } => {
                let state = &mut flight[slot];
                state.timings.stages.decode += seconds.as_secs_f64();
                stats.data += seconds;
                state.timings.real_images = images;
                state.timings.latent_cache_hit = true;
                state.crops = crops;
                let _ = kmeans.send(ToKmeans { slot, features, count: images, names, cache: Some((key, content)) });
            }
            Event::Skipped { slot, skipped, versions_changed } => {
                flight[slot].timings.skipped = skipped;
                flight[slot].timings.versions_changed = versions_changed;
            }
            Event::Modes { slot, modes, real, seconds, cached } => {
                let state = &mut flight[slot];
                state.timings.modes_cache_hit = cached;
                state.real = real;
                state.timings.stages.kmeans += seconds.as_secs_f64();
                stats.kmeans += seconds;
                state.modes = Some(modes);
                state.has_modes = true;
                stats.modes_ready[slot] = Some(started.elapsed());
                ready.extend((0..classes[slot].ipc).map(|j| (slot, j)));
            }
            Event::Failed { slot, error } => {
                if classes.len() > 1 {
                    warn!(class = %classes[slot].wnid, error = %mgd3_common::error_chain(&error), "class failed; the shard's other classes go on");
                }
                flight[slot].features = Vec::new();
                failed.entry(slot).or_insert(error);
            }
        }
        Ok(())
    }

    /// The labels, modes and noise of one DiT batch of `(slot, sample)` pairs.
    fn batch_inputs(
        &self,
        classes: &[ClassSpec],
        flight: &[InFlight],
        batch: &[(usize, usize)],
    ) -> (Vec<i64>, Array4<f32>, ndarray::Array5<f32>) {
        let shape = self.models.dit().info().latent_shape;
        let labels: Vec<i64> = batch.iter().map(|&(slot, _)| classes[slot].label).collect();
        let mode_views: Vec<_> = batch
            .iter()
            .map(|&(slot, j)| flight[slot].modes.as_ref().expect("modes").index_axis(Axis(0), j).insert_axis(Axis(0)))
            .collect();
        let modes = ndarray::concatenate(Axis(0), &mode_views).expect("same shapes");
        let samples: Vec<(u64, u64)> = batch.iter().map(|&(slot, j)| (classes[slot].class_index, j as u64)).collect();
        let (seed, steps) = (self.seed, self.schedule.steps());
        let noise = self.pool.install(|| batch_noise(seed, &samples, steps, shape));
        (labels, modes, noise)
    }

    /// Samples one DiT batch, or two in flight ([`Models::sample_pair`]), and files each sample's
    /// x₀ with its class, counting every step's images into `image_steps`. Returns the slots of
    /// the classes now fully sampled.
    fn sample_batches<E>(
        &mut self,
        classes: &[ClassSpec],
        flight: &mut [InFlight],
        batches: &[Vec<(usize, usize)>],
        image_steps: &AtomicU64,
        stats: &mut ShardStats,
    ) -> Result<Vec<usize>, ShardStop<E>> {
        let started = Instant::now();
        let inputs: Vec<_> = batches.iter().map(|batch| self.batch_inputs(classes, flight, batch)).collect();
        fn view((labels, modes, noise): &(Vec<i64>, Array4<f32>, ndarray::Array5<f32>)) -> SampleInputs<'_> {
            SampleInputs { labels, modes: modes.view(), noise: noise.view() }
        }
        let results = match inputs.as_slice() {
            [a, b] => Vec::from(self.models.sample_pair(
                &self.schedule,
                &self.sampling,
                [view(a), view(b)],
                &mut stats.dit_rows,
                image_steps,
                self.stop_now.as_deref(),
            )),
            [a] => {
                let run = view(a);
                vec![self.models.sample(
                    &self.schedule,
                    &self.sampling,
                    run.labels,
                    run.modes,
                    run.noise,
                    &mut stats.dit_rows,
                    self.stop_now.as_deref(),
                    |_, x| {
                        image_steps.fetch_add(x.shape()[0] as u64, Ordering::Relaxed);
                    },
                )]
            }
            _ => unreachable!("one or two DiT batches at a time"),
        };
        let wall = started.elapsed();
        stats.sample += wall;
        if batches.len() == 2 {
            stats.paired_batches += 2;
        }
        let samples: usize = batches.iter().map(Vec::len).sum();
        let shape = self.models.dit().info().latent_shape;
        let mut done = Vec::new();
        for (batch, result) in batches.iter().zip(results) {
            if let Err(crate::mgd3::sampler::SampleError::Model { source, .. }) = &result
                && source.is::<crate::models::Stopped>()
            {
                return Err(ShardStop::Engine { class: None, error: Box::new(EngineError::Cancelled) });
            }
            let (x, timings) = result.map_err(|source| {
                let failed = source.sample_index().and_then(|i| batch.get(i).copied());
                match failed {
                    Some((slot, j)) => ShardStop::class(
                        &classes[slot],
                        EngineError::Sample { class: classes[slot].wnid.clone(), source: source.with_sample(j) },
                    ),
                    None => ShardStop::class(
                        &classes[batch[0].0],
                        EngineError::Sample { class: classes[batch[0].0].wnid.clone(), source },
                    ),
                }
            })?;
            let share = |d: Duration, mine: usize| d.mul_f64(mine as f64 / batch.len() as f64);
            for (row, &(slot, j)) in batch.iter().enumerate() {
                let state = &mut flight[slot];
                let ipc = classes[slot].ipc;
                let latents = state.latents.get_or_insert_with(|| Array4::zeros((ipc, shape[0], shape[1], shape[2])));
                latents.index_axis_mut(Axis(0), j).assign(&x.index_axis(Axis(0), row));
                state.sampled += 1;
                if state.sampled == ipc {
                    done.push(slot);
                }
            }
            let mut seen: Vec<usize> = batch.iter().map(|&(slot, _)| slot).collect();
            seen.dedup();
            for slot in seen {
                let mine = batch.iter().filter(|(s, _)| *s == slot).count();
                let state = &mut flight[slot];
                state.timings.stages.dit += share(timings.model, mine).as_secs_f64();
                state.timings.stages.guidance += share(timings.maths, mine).as_secs_f64();
                state.timings.sampling_wall += wall.mul_f64(mine as f64 / samples as f64).as_secs_f64();
                state.timings.dit_calls += timings.model_calls;
            }
            stats.dit_busy += timings.model;
            debug!(samples = batch.len(), in_flight = batches.len(), classes = ?batch.iter().map(|(s, _)| &classes[*s].wnid).collect::<std::collections::BTreeSet<_>>(), "sampled batch");
        }
        Ok(done)
    }

    /// VAE-decodes and PNG-encodes a class whose samples are all done, hands it to `outputs`
    /// and, if this attempt's files won, builds its contact sheet.
    fn finish_class<S: ClassSink + ?Sized>(
        &mut self,
        classes: &[ClassSpec],
        state: &mut InFlight,
        slot: usize,
        options: ShardOptions,
        sink: &mut S,
        stats: &mut ShardStats,
    ) -> Result<(), ShardStop<S::Error>> {
        let class = &classes[slot];
        let started = Instant::now();
        let latents = state.latents.take().expect("sampled latents");
        let modes = state.modes.take().expect("modes");
        let (images, decoded) = self
            .models
            .decode_png(&self.pool, &class.wnid, latents.view(), &mut state.timings)
            .map_err(|e| ShardStop::class(class, e))?;
        stats.finish += started.elapsed();
        let samples: Vec<Pixels> =
            if options.contact_sheet { decoded.outer_iter().map(sink::tensor_pixels).collect() } else { Vec::new() };
        drop(decoded);
        let timings = std::mem::take(&mut state.timings);
        debug!(class = %class.wnid, label = class.label, ipc = class.ipc, real_images = timings.real_images,
              seconds = timings.total().as_secs_f64(), "distilled class");
        // The modes stay for the contact sheet only when one is made.
        let (modes, sheet_modes) = if options.contact_sheet { (modes.clone(), Some(modes)) } else { (modes, None) };
        // Diversity, representativeness and the latent-space picture, from the real latents the
        // modes came from and the sampled latents (before the contact sheet takes the modes).
        let measured = Instant::now();
        let dim = latents.len() / latents.shape()[0].max(1);
        let real = ndarray::ArrayView2::from_shape((state.real.len() / dim.max(1), dim), &state.real)
            .expect("real latents are whole rows");
        fn flat(a: &Array4<f32>, dim: usize) -> ndarray::ArrayView2<'_, f32> {
            a.view().into_shape_with_order((a.shape()[0], dim)).expect("contiguous latents")
        }
        let quality = crate::mgd3::quality::class_quality(real, flat(&latents, dim));
        let embedding = crate::mgd3::quality::embedding(real, flat(&modes, dim), flat(&latents, dim));
        state.real = Vec::new();
        debug!(class = %class.wnid, diversity = quality.diversity_normalised, representativeness = quality.representativeness_normalised,
               seconds = measured.elapsed().as_secs_f64(), "class quality");
        drop(latents);
        let modes_path = std::path::PathBuf::from(format!("{}/modes.npy", class.wnid));
        let modes_npy = sink::npy_bytes(&modes, &modes_path).map_err(|e| ShardStop::class(class, e))?;
        let result = ClassResult {
            files: ClassFiles { images, modes_npy },
            timings,
            contact_sheet: None,
            quality: Some(quality),
            embedding: Some(embedding),
        };
        let committing = Instant::now();
        let won = sink.commit(&class.class, result).map_err(ShardStop::Sink)?;
        stats.commit += committing.elapsed();
        if won && let Some(modes) = sheet_modes {
            let started = Instant::now();
            match self.contact_sheet_png(&class.class, std::mem::take(&mut state.crops), modes, samples) {
                Ok(png) => sink.contact_sheet(&class.class, png),
                Err(error) => warn!(class = %class.wnid, error = %mgd3_common::error_chain(&error), "no contact sheet"),
            }
            stats.finish += started.elapsed();
        }
        Ok(())
    }

    /// The sheet's three rows: the first IPC real images as preprocessed, the modes decoded by
    /// the VAE, the samples (sample j under mode j).
    fn contact_sheet_png(
        &mut self,
        class: &ClassRef,
        real: Vec<Pixels>,
        modes: Array4<f32>,
        samples: Vec<Pixels>,
    ) -> Result<Vec<u8>, EngineError> {
        let decoded_modes = self.models.decode(modes.view())?;
        let rows = [real, decoded_modes.outer_iter().map(sink::tensor_pixels).collect(), samples];
        Ok(sink::contact_sheet_png(&sheet_title(class), &rows)?)
    }
}

/// A contact sheet's title: the class folder, the DiT label, and the class's ImageNet name when
/// it is the ImageNet synset of its label (no name is guessed for other datasets). The name comes
/// last: a narrow sheet (IPC 1 or 2) cuts the title's end, and the folder and label are what
/// identify the class.
fn sheet_title(class: &ClassRef) -> String {
    let imagenet = mgd3_common::classes::imagenet1k_label(&class.wnid)
        .ok()
        .filter(|&label| label as i64 == class.label)
        .and_then(mgd3_common::classes::imagenet1k_name);
    match imagenet {
        Some(name) => format!("{} - label {} - {name}", class.wnid, class.label),
        None => format!("{} - label {}", class.wnid, class.label),
    }
}

/// The data thread's share of a shard.
struct DataStage<'a> {
    dataset: Dataset,
    classes: &'a [ClassSpec],
    image_shape: [usize; 3],
    latent_dim: usize,
    /// Images per chunk handed to the encoder.
    encode_chunk: usize,
    vae_fingerprint: String,
    latent_cache: Option<mgd3_common::store::Location>,
    pool: crate::cpu::CpuPool,
    keep_crops: bool,
    /// The caller's runtime: listings and object-store reads run on it (one connection pool),
    /// not on a fresh runtime per call.
    runtime: Option<tokio::runtime::Handle>,
}

impl DataStage<'_> {
    fn run(&self, events: &mpsc::SyncSender<Event>, stopped: impl Fn() -> bool) {
        let _runtime = self.runtime.as_ref().map(|handle| handle.enter());
        for (slot, class) in self.classes.iter().enumerate() {
            if stopped() {
                return;
            }
            if let Err(error) = self.class(slot, class, events, &stopped)
                && events.send(Event::Failed { slot, error }).is_err()
            {
                return;
            }
        }
    }

    fn class(
        &self,
        slot: usize,
        class: &ClassSpec,
        events: &mpsc::SyncSender<Event>,
        stopped: &impl Fn() -> bool,
    ) -> Result<(), EngineError> {
        let mut started = Instant::now();
        let listing = self.dataset.list_class(&class.wnid)?;
        let versions_changed = data::check_unchanged(class, &listing)?;
        let listing_digest = listing.digest();
        let images = listing.images;
        if images.len() < class.ipc {
            return Err(
                DataError::TooFewImages { class: class.wnid.clone(), found: images.len(), ipc: class.ipc }.into()
            );
        }
        if events.send(Event::Skipped { slot, skipped: listing.skipped, versions_changed }).is_err() {
            return Ok(());
        }
        let keep = if self.keep_crops { class.ipc.min(images.len()) } else { 0 };
        let cache_key = self.latent_cache.as_ref().map(|_| {
            let content = class.listing.as_ref().and_then(|l| l.content_digest.as_deref());
            cache::latent_key(&self.dataset.url(), &self.vae_fingerprint, &class.wnid, &images, content)
        });
        if let (Some(cache), Some(key)) = (&self.latent_cache, &cache_key)
            && let Some(entry) = cache::load(cache, key, images.len(), self.latent_dim)?
            && let Some((content, read)) =
                self.cached_content(class, &images, &listing_digest, entry.source, stopped)?
        {
            info!(class = %class.wnid, key = %key, "latent cache hit: skipping decode and VAE encode");
            if read {
                // The entry now records this listing: the next job over the same files (a sweep
                // over one staged copy) is a hit without reading them. Best effort: a cache that
                // cannot be written costs a later job the reading again, nothing else.
                let source = cache::Source { listing: listing_digest.clone(), content: content.clone() };
                if let Err(error) =
                    cache::store(cache, key, &entry.values, images.len(), self.latent_dim, Some(&source))
                {
                    warn!(class = %class.wnid, key = %key, error = %mgd3_common::error_chain(&error), "could not record the class's current file times in its latent cache entry; a later job reads and hashes its files again");
                }
            }
            let crops = self.decode_chunk(class, &images[..keep], keep, false)?.crops;
            let seconds = started.elapsed();
            let names = images.iter().map(|image| image.display()).collect();
            let features = entry.values;
            let event = Event::Cached {
                slot,
                key: key.clone(),
                content,
                features,
                names,
                crops,
                images: images.len(),
                seconds,
            };
            let _ = events.send(event);
            return Ok(());
        }
        let size = self.encode_chunk.max(1);
        let chunks = images.len().div_ceil(size);
        // Each file's sha256, as read for decoding: what the cached latents are computed from.
        let mut hashes = Vec::with_capacity(if cache_key.is_some() { images.len() } else { 0 });
        for (index, chunk) in images.chunks(size).enumerate() {
            if stopped() {
                return Ok(());
            }
            let first = index * size;
            let DecodedChunk { batch, crops, hashes: chunk_hashes } =
                self.decode_chunk(class, chunk, keep.saturating_sub(first), cache_key.is_some())?;
            hashes.extend(chunk_hashes);
            let last = index + 1 == chunks;
            let event = Event::Chunk {
                slot,
                batch,
                names: chunk.iter().map(|image| image.display()).collect(),
                crops,
                images: images.len(),
                last,
                seconds: started.elapsed(),
                cache: match &cache_key {
                    Some(key) if last => {
                        let content = mgd3_common::imagefolder::content_digest(&images, &hashes);
                        Some((key.clone(), cache::Source { listing: listing_digest.clone(), content }))
                    }
                    _ => None,
                },
            };
            if events.send(event).is_err() {
                return Ok(());
            }
            // Time blocked on a full queue is not data work.
            started = Instant::now();
        }
        Ok(())
    }

    /// The content digest a cached latents entry of this class was computed from, when it holds
    /// for the class's files now (`None`: a miss, to be computed again), and whether the files
    /// were read to find so. The same listing (`listing_digest`: names, sizes, modification and
    /// change times or ETags) as the entry's is trusted without reading a file; another one (a
    /// copy of the dataset, a `touch`, a file rewritten in place at the same size, with or without
    /// its old modification time) has every file read and hashed, which is still far less than
    /// decoding and encoding them. An entry that records no source (written by an older mgd3)
    /// is a miss.
    fn cached_content(
        &self,
        class: &ClassSpec,
        images: &[mgd3_common::imagefolder::ImageRef],
        listing_digest: &str,
        source: Option<cache::Source>,
        stopped: &impl Fn() -> bool,
    ) -> Result<Option<(String, bool)>, EngineError> {
        let Some(source) = source else {
            debug!(class = %class.wnid, "cached latents record no source (an older mgd3's): computing them again");
            return Ok(None);
        };
        if source.listing == listing_digest {
            return Ok(Some((source.content, false)));
        }
        let mut hashes = Vec::with_capacity(images.len());
        for chunk in images.chunks(self.encode_chunk.max(1)) {
            if stopped() {
                return Ok(None);
            }
            let bytes = self.dataset.read(&class.wnid, chunk)?;
            hashes
                .extend(self.pool.install(|| bytes.par_iter().map(|b| mgd3_common::sha256_hex(b)).collect::<Vec<_>>()));
        }
        let content = mgd3_common::imagefolder::content_digest(images, &hashes);
        if content == source.content {
            debug!(class = %class.wnid, "cached latents: other file times or ETags, same contents (a copy of the dataset)");
            Ok(Some((content, true)))
        } else {
            warn!(
                class = %class.wnid,
                "the cached latents of this class were computed from other contents at the same file names and sizes (files rewritten in place): encoding the files as they are now"
            );
            Ok(None)
        }
    }

    /// Reads and preprocesses `chunk` on the CPU pool into `[b, c, S, S]`; the crops of its
    /// first `keep` images are kept for the contact sheet, and with `hash` each file's sha256
    /// (`sha256:<hex>`, in `chunk`'s order; empty without).
    fn decode_chunk(
        &self,
        class: &ClassSpec,
        chunk: &[mgd3_common::imagefolder::ImageRef],
        keep: usize,
        hash: bool,
    ) -> Result<DecodedChunk, EngineError> {
        let [channels, size, _] = self.image_shape;
        let per_image = channels * size * size;
        let bytes = self.dataset.read(&class.wnid, chunk)?;
        let mut batch = vec![0f32; chunk.len() * per_image];
        let decoded = self.pool.install(|| {
            batch
                .par_chunks_mut(per_image)
                .zip(chunk.par_iter().zip(bytes.par_iter()))
                .enumerate()
                .map(|(i, (out, (image, bytes)))| {
                    let crop = data::preprocess_into(bytes, Path::new(&image.display()), channels, size, out)?;
                    Ok(((i < keep).then_some(crop), hash.then(|| mgd3_common::sha256_hex(bytes))))
                })
                .collect::<Result<Vec<_>, DataError>>()
        })?;
        let batch = Array4::from_shape_vec((chunk.len(), channels, size, size), batch).expect("b × c × S × S");
        let (crops, hashes): (Vec<_>, Vec<_>) = decoded.into_iter().unzip();
        Ok(DecodedChunk {
            batch,
            crops: crops.into_iter().flatten().collect(),
            hashes: hashes.into_iter().flatten().collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The folder and label lead the title, so that a narrow sheet, which cuts its end, still
    /// names the class; the ImageNet name is added only for the synset of its label.
    #[test]
    fn a_sheet_title_leads_with_the_folder_and_label() {
        let class = |wnid: &str, label| ClassRef { wnid: wnid.into(), label, class_index: 0, listing: None };
        assert_eq!(sheet_title(&class("n01440764", 0)), "n01440764 - label 0 - tench, Tinca tinca");
        assert_eq!(sheet_title(&class("n01440764", 3)), "n01440764 - label 3");
        assert_eq!(sheet_title(&class("03_dress", 3)), "03_dress - label 3");
    }
}
