//! What a worker runs classes with: the [`ShardEngine`] trait, the real ONNX engine (which keeps
//! the last job's models loaded and publishes their fingerprints, [`LoadedModels`]) and the
//! stand-in [`FakeEngine`] for cluster tests and scale benchmarks.

use crate::cpu::CpuPool;
use crate::data::Dataset;
use crate::failure::{ShardError, ShardFailure};
use crate::models::{ClassSpec, ClassTimings, EngineError, ModelPaths, Runtime};
use crate::pipeline::{ClassResult, ClassSink};
use crate::pipeline::{Engine, ShardOptions, ShardStop};
use crate::sink::npy_bytes;
use image::{ImageFormat, RgbImage};
use mgd3_common::batch::BatchPolicy;
use mgd3_common::commit::ClassFiles;
use mgd3_common::job::{ClassRef, JobSpec};
use mgd3_common::manifest::StageSeconds;
use mgd3_common::seed::sample_seed;
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

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

    /// Hands the engine the flag of a revoked lease: once set, sampling stops before its next
    /// DiT call (the classes in progress would be discarded anyway, and a class is a whole
    /// denoising trajectory, minutes at DiT-XL/2 scale), where `cancel` alone (a shutdown) lets
    /// the current batch finish and commit. Engines without DiT calls of their own ignore it.
    fn set_stop_now(&mut self, _stop_now: Arc<AtomicBool>) {}

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

    /// The batch policy this engine calls its models with, reported at registration so the
    /// coordinator sizes shards by it; `None` for engines without models.
    fn batch_policy(&self) -> Option<BatchPolicy> {
        None
    }
}

/// The fingerprints of the models an engine has loaded (the path or URL as the job spec names
/// it → `sha256:<hex>`) and the batch policy their calls run with, shared between the engine,
/// which publishes them when it loads models, and the client, which reads them to register and
/// reports the policy with its polls.
#[derive(Clone, Debug, Default)]
pub struct LoadedModels(Arc<std::sync::RwLock<Published>>);

/// What [`LoadedModels`] holds.
#[derive(Clone, Debug, Default)]
struct Published {
    fingerprints: Vec<(String, String)>,
    /// The policy of the loaded models (`--dit-rows auto` chooses the DiT's rows at load);
    /// `None` before any load.
    policy: Option<BatchPolicy>,
}

impl LoadedModels {
    /// A handle holding `fingerprints`.
    pub fn new(fingerprints: Vec<(String, String)>) -> Self {
        LoadedModels(Arc::new(std::sync::RwLock::new(Published { fingerprints, policy: None })))
    }

    /// The fingerprints now.
    pub fn get(&self) -> Vec<(String, String)> {
        self.0.read().expect("loaded models").fingerprints.clone()
    }

    /// Publishes the fingerprints of the models now loaded.
    pub fn set(&self, fingerprints: Vec<(String, String)>) {
        self.0.write().expect("loaded models").fingerprints = fingerprints;
    }

    /// The batch policy of the models now loaded (`None` before any load).
    pub fn policy(&self) -> Option<BatchPolicy> {
        self.0.read().expect("loaded models").policy
    }

    /// Publishes the batch policy of the models now loaded.
    pub fn set_policy(&self, policy: BatchPolicy) {
        self.0.write().expect("loaded models").policy = Some(policy);
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
    runtime: Runtime,
    pool: CpuPool,
    /// The engine of the last job, keyed by what it depends on.
    loaded: Option<LoadedEngine>,
    /// The fingerprints of the models `loaded` holds, published for registration.
    published: LoadedModels,
    /// The revoked-lease flag of the shard to run next ([`ShardEngine::set_stop_now`]).
    stop_now: Option<Arc<AtomicBool>>,
}

impl OnnxShardEngine {
    /// Models run with `runtime` (session settings and batch policy); decoding, preprocessing,
    /// k-means and PNG encoding on `pool`.
    pub fn new(runtime: Runtime, pool: CpuPool) -> Self {
        OnnxShardEngine { runtime, pool, loaded: None, published: LoadedModels::default(), stop_now: None }
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
            let engine = match Engine::load(&paths, &self.runtime, spec.sampling, spec.seed) {
                Ok(engine) => engine,
                // A model this worker cannot open may be fine elsewhere (node-local paths).
                Err(EngineError::Model(
                    e @ (mgd3_onnx::Error::ModelNotFound(_)
                    | mgd3_onnx::Error::CudaUnavailable { .. }
                    | mgd3_onnx::Error::TensorRtUnavailable { .. }
                    | mgd3_onnx::Error::NeedsCuda { .. }
                    | mgd3_onnx::Error::UnsupportedIrVersion { .. }
                    | mgd3_onnx::Error::LoadFailed { .. }
                    | mgd3_onnx::Error::CudaGraph { .. }
                    | mgd3_onnx::Error::RuntimeUnavailable { .. }),
                )) => {
                    return Err(ShardFailure::ModelUnavailable(e));
                }
                // A file that is no model, unreadable or given as another kind here, though submit
                // saw the job's files: if its bytes differ from the job's, this node's copy is the
                // problem (another worker's may be right), not the job.
                // A model's files not all here (external data missing, cut short, outside its
                // folder), found before ONNX Runtime tries: another worker may have them. Named by
                // the job's path or URL.
                Err(EngineError::ModelFiles(source)) => {
                    let named = [
                        (&spec.models.dit, &paths.dit),
                        (&spec.models.vae_encoder, &paths.vae_encoder),
                        (&spec.models.vae_decoder, &paths.vae_decoder),
                    ]
                    .into_iter()
                    .find(|(_, path)| path.as_path() == source.model())
                    .map_or_else(|| source.model().display().to_string(), |(named, _)| named.clone());
                    return Err(ShardFailure::ModelFiles { path: named, source });
                }
                Err(e @ (EngineError::MisplacedModels { .. } | EngineError::UnusableModels { .. })) => {
                    return Err(changed_here(spec, &paths).unwrap_or_else(|| e.into()));
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
            self.published.set_policy(*engine.policy());
            self.loaded = Some(LoadedEngine { key, engine });
            self.published.set(fingerprints);
        }
        Ok(&mut self.loaded.as_mut().expect("just loaded").engine)
    }
}

/// The first model whose file here does not have the fingerprint the job was submitted with
/// (unreadable files are left out: their error says more), as [`ShardFailure::ModelMismatch`].
fn changed_here(spec: &JobSpec, paths: &ModelPaths) -> Option<ShardFailure> {
    let m = &spec.models;
    [
        (&m.dit, &m.dit_fingerprint, &paths.dit),
        (&m.vae_encoder, &m.vae_encoder_fingerprint, &paths.vae_encoder),
        (&m.vae_decoder, &m.vae_decoder_fingerprint, &paths.vae_decoder),
    ]
    .into_iter()
    .find_map(|(named, want, path)| {
        let want = want.as_ref()?;
        let have = mgd3_common::fingerprint_file(path).ok()?;
        (have != *want).then(|| ShardFailure::ModelMismatch { path: named.clone(), have, want: want.clone() })
    })
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

    fn set_stop_now(&mut self, stop_now: Arc<AtomicBool>) {
        self.stop_now = Some(stop_now);
    }

    /// The pipelined shard: see [`crate::pipeline`].
    fn distill_shard(
        &mut self,
        spec: &JobSpec,
        classes: &[ClassRef],
        cancel: &Arc<AtomicBool>,
        sink: &mut dyn ClassSink<Error = ShardError>,
    ) -> Result<(), ShardError> {
        let stop_now = self.stop_now.take();
        let engine = self.engine_for(spec).map_err(ShardError::shard)?;
        engine.set_cancel_flag(cancel.clone());
        engine.set_stop_now(stop_now);
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

    fn batch_policy(&self) -> Option<BatchPolicy> {
        Some(self.runtime.policy)
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
