//! Commit markers (one per class, written create-only) and the merged job manifest.

use serde::{Deserialize, Serialize};

/// Version of the marker and manifest JSON layout, written as `schema_version`.
pub const SCHEMA_VERSION: u32 = 1;

/// One committed file of a class.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    /// Name inside the class folder (`3.png`, `modes.npy`).
    pub name: String,
    /// `sha256:<hex>` of the file's bytes.
    pub sha256: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// Per-stage seconds of one class (wall-clock time spent on the class; a DiT call shared by
/// several classes is split by their share of its samples).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StageSeconds {
    /// Listing, reading, decoding and preprocessing the real images (on a latent-cache hit: loading
    /// the cached latents).
    pub decode: f64,
    /// VAE-encoding the real images into latents.
    pub encode: f64,
    /// k-means mode discovery.
    pub kmeans: f64,
    /// DiT calls of the sampling loop.
    pub dit: f64,
    /// The reverse steps between DiT calls (CFG, mode guidance, the DDPM or DDIM update).
    pub guidance: f64,
    /// VAE-decoding the sampled latents into images.
    pub vae_decode: f64,
    /// PNG encoding of the decoded images.
    pub png: f64,
}

impl StageSeconds {
    /// Adds `other` stage by stage (the job manifest sums its classes this way).
    pub fn add(&mut self, other: &StageSeconds) {
        self.decode += other.decode;
        self.encode += other.encode;
        self.kmeans += other.kmeans;
        self.dit += other.dit;
        self.guidance += other.guidance;
        self.vae_decode += other.vae_decode;
        self.png += other.png;
    }
}

/// A class's distilled samples measured against its real data, in the scaled VAE latent space the
/// worker samples in (latents flattened to `C·h·w` vectors, Euclidean distance), with the paper's
/// definitions (MGD³ §5.2, Table 9; the paper measures in a t-SNE plane instead):
///
/// - **diversity**: the mean over samples of the distance to the nearest other sample of the
///   class (larger: more diverse);
/// - **representativeness**: the mean over samples of the mean distance to the sample's
///   `neighbours` (50, or all when fewer) nearest real latents (smaller: more representative).
///
/// The paper does not say how it maps these into [0, 1]. Here both are also given divided by
/// `real_spread`, the mean distance between two real latents of the class, so that classes and
/// datasets compare: a `diversity_normalised` of 1 means samples lie as far apart as two random
/// real images do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassQuality {
    /// Mean nearest-neighbour distance among the samples (0 for IPC 1).
    pub diversity: f64,
    /// Mean distance of a sample to its `neighbours` nearest real latents.
    pub representativeness: f64,
    /// How many nearest real latents `representativeness` averages over.
    pub neighbours: u32,
    /// Mean distance between two distinct real latents (all pairs, or pairs of at most 512
    /// real latents evenly spaced in listing order).
    pub real_spread: f64,
    /// `diversity / real_spread`.
    pub diversity_normalised: f64,
    /// `representativeness / real_spread`.
    pub representativeness_normalised: f64,
}

/// The band of [`ClassQuality`] numbers a class's samples normally fall in. Measured on the
/// Fashion-MNIST demo (λ 0.1, t_stop 25): representativeness ÷ real spread 0.39–1.0 and
/// diversity ÷ real spread 0.38–0.9 over its classes and IPCs, and real images themselves about
/// 0.8–1; a class sampled under another class's label gave 1.29–2.33 (a near class, 1.16: the band does not
/// catch every wrong label), random-weight models 2.7–13.
pub mod band {
    /// Above this `representativeness_normalised` the samples lie farther from the class's real
    /// images than those lie from each other.
    pub const REPRESENTATIVENESS_MAX: f64 = 1.2;
    /// Below this `diversity_normalised` (IPC ≥ 2) the samples are nearly one image.
    pub const DIVERSITY_MIN: f64 = 0.1;
}

/// A class whose quality numbers fall outside [`band`], and what that usually means.
#[derive(Clone, Debug, PartialEq)]
pub enum QualityConcern {
    /// The samples do not resemble the class's real images.
    FarFromData {
        /// `representativeness_normalised`.
        representativeness: f64,
    },
    /// The samples are nearly identical.
    Collapsed {
        /// `diversity_normalised`.
        diversity: f64,
    },
}

impl std::fmt::Display for QualityConcern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QualityConcern::FarFromData { representativeness } => write!(
                f,
                "samples do not resemble the class's real images (representativeness {representativeness:.2} × the \
                 real spread, band ≤ {}): usually models that do not match the data (a DiT or VAE trained on other \
                 images, or random weights), labels that make the DiT draw another class (check `labels`), or λ or \
                 cfg_scale too large for the model",
                band::REPRESENTATIVENESS_MAX
            ),
            QualityConcern::Collapsed { diversity } => write!(
                f,
                "samples are nearly identical (diversity {diversity:.2} × the real spread, band ≥ {}): usually λ too \
                 large, or a DiT that ignores its noise (a broken export)",
                band::DIVERSITY_MIN
            ),
        }
    }
}

impl ClassQuality {
    /// What falls outside [`band`] for a class of `ipc` samples (diversity needs two).
    pub fn concerns(&self, ipc: usize) -> Vec<QualityConcern> {
        let mut concerns = Vec::new();
        if self.representativeness_normalised.is_nan()
            || self.representativeness_normalised > band::REPRESENTATIVENESS_MAX
        {
            concerns.push(QualityConcern::FarFromData { representativeness: self.representativeness_normalised });
        }
        if ipc >= 2 && (self.diversity_normalised.is_nan() || self.diversity_normalised < band::DIVERSITY_MIN) {
            concerns.push(QualityConcern::Collapsed { diversity: self.diversity_normalised });
        }
        concerns
    }
}

/// A 2-D picture of a class in latent space: real latents, modes and samples projected onto the
/// first two principal components of the class's real latents (PCA, not the paper's t-SNE: it is
/// deterministic, cheap and keeps distances along its axes meaningful).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Embedding {
    /// `pca`.
    pub method: String,
    /// Share of the real latents' variance each axis explains.
    pub explained_variance: [f64; 2],
    /// Real latents, at most 300 evenly spaced in listing order.
    pub real: Vec<[f32; 2]>,
    /// Mode j at index j.
    pub modes: Vec<[f32; 2]>,
    /// Sample j at index j (guided to mode j).
    pub samples: Vec<[f32; 2]>,
}

/// The commit marker `shards/<wnid>.json`: a class is done iff this exists and names the job's
/// fingerprint. It lists every file of the attempt that won, so publishing can be verified.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassMarker {
    /// [`SCHEMA_VERSION`] of the writer.
    pub schema_version: u32,
    /// The job the class belongs to.
    pub job_id: String,
    /// The job's fingerprint (`sha256:<hex>`); a marker naming another one is not a commit of this
    /// job.
    pub fingerprint: String,
    /// The attempt whose files won the commit.
    pub attempt_id: String,
    /// The worker that ran that attempt.
    pub worker_id: String,
    /// The class folder name (an ImageNet wnid for ImageNet jobs).
    pub wnid: String,
    /// The DiT class label the class was sampled with.
    pub label: i64,
    /// Position of the class in the job's class list (seeds its RNG streams).
    pub class_index: u64,
    /// The distilled images `0.png` … in sample order, IPC of them.
    pub images: Vec<FileDigest>,
    /// The class's `modes.npy`.
    pub modes: FileDigest,
    /// Real images of the class that were encoded and clustered.
    pub real_images: u64,
    /// Where the attempt's time went.
    pub timings: StageSeconds,
    /// When the marker was written, in milliseconds since the Unix epoch.
    pub committed_unix_ms: u64,
    /// The class's latents came from the latent cache (no decode or VAE encode).
    #[serde(default)]
    pub latent_cache_hit: bool,
    /// The class's k-means modes came from the latent cache: another job over the same data,
    /// VAE, IPC and seed (a sweep's other variant) had found them (no k-means run).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub modes_cache_hit: bool,
    /// Entries of the class folder the listing rule left out (hidden, not images).
    #[serde(default)]
    pub skipped: crate::imagefolder::Skipped,
    /// Diversity and representativeness of the samples (absent from engines without latents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<ClassQuality>,
    /// The class in latent space, for the job report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding: Option<Embedding>,
    /// The class's files had the names and sizes submit recorded but other file times or
    /// ETags: a copy of the dataset (`cp -r`), or files rewritten in place with the same size,
    /// which mgd3 cannot tell apart without reading every image.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub versions_changed: bool,
    /// The class's data as the job recorded it when this attempt distilled it (names and sizes,
    /// and content when the job hashes it): what `resume` compares the data now with, so a commit
    /// made from other data is found even after the job's record was updated. Absent from
    /// markers of earlier versions and of jobs without recorded listings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<crate::imagefolder::ListingSummary>,
    /// The attempt writes its contact sheet with a record ([`SheetRecord`]) after this marker:
    /// a sheet without a record is then one whose record was lost, not an earlier version's
    /// (which wrote none; absent from their markers).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sheet_record: bool,
}

/// `contact_sheets/<wnid>.json`: what the attempt that committed a class wrote as its contact
/// sheet, written right after the sheet. The sheet is made after the commit (its marker cannot
/// list it); this record is what ties it to the class and the attempt, so a sheet of another
/// class, of an earlier attempt or changed after it was written is found by `report` and
/// `verify` instead of being shown as this class's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SheetRecord {
    /// [`SCHEMA_VERSION`] of the writer.
    pub schema_version: u32,
    /// The job.
    pub job_id: String,
    /// The class the sheet shows.
    pub wnid: String,
    /// The attempt that made it (the one its class's marker names).
    pub attempt_id: String,
    /// `sha256:<hex>` of the sheet's bytes.
    pub sha256: String,
    /// The sheet's size in bytes.
    pub bytes: u64,
}

/// One class of the job manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ManifestClass {
    /// The class folder name.
    pub wnid: String,
    /// The DiT class label.
    pub label: i64,
    /// The distilled images, as the class's marker lists them.
    pub images: Vec<FileDigest>,
    /// `sha256:<hex>` of the class's `modes.npy`.
    pub modes_sha256: String,
    /// Size of the class's `modes.npy` in bytes (absent from manifests of earlier versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modes_bytes: Option<u64>,
    /// The attempt whose files were committed.
    pub attempt_id: String,
    /// The class's diversity and representativeness, as its marker has them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<ClassQuality>,
    /// Links the class's listing did not follow (cycles, folders outside the class, second names
    /// of one file), as its marker has them: the first 20, by name and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped_links: Vec<crate::imagefolder::SkippedLink>,
    /// As the marker's `versions_changed`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub versions_changed: bool,
    /// As the marker's `latent_cache_hit`: the class's encodings were reused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub latents_reused: bool,
    /// As the marker's `modes_cache_hit`: the class's modes were reused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub modes_reused: bool,
}

/// What a job took from the latent cache instead of computing it: classes whose encodings
/// (real-image latents) and k-means modes were reused, e.g. from another variant of a sweep.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reused {
    /// Classes whose latents came from the cache.
    pub latents: u64,
    /// Classes whose modes came from the cache.
    pub modes: u64,
    /// Where the cache is (`latent_cache` resolved), when the job has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<String>,
}

/// `manifest.json`, written when every class is committed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobManifest {
    /// [`SCHEMA_VERSION`] of the writer.
    pub schema_version: u32,
    /// The job id.
    pub job_id: String,
    /// The job's fingerprint (`sha256:<hex>`).
    pub fingerprint: String,
    /// The resolved job spec.
    pub spec: crate::job::JobSpec,
    /// `sha256:<hex>` of each model by role (`dit`, `vae_encoder`, `vae_decoder`), for those the
    /// spec holds.
    pub model_fingerprints: std::collections::BTreeMap<String, String>,
    /// Every class, in the job's class order.
    pub classes: Vec<ManifestClass>,
    /// Distilled images in all.
    pub images: u64,
    /// The classes' stage seconds, summed.
    pub timings: StageSeconds,
    /// When the job was submitted, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// When the job's work first ended (the manifest first written), in milliseconds since the
    /// Unix epoch: kept when the manifest is written again.
    pub finished_unix_ms: u64,
    /// When classes of the finished job were last distilled again (published files lost and
    /// put back, data changes accepted), in milliseconds since the Unix epoch; absent when never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repaired_unix_ms: Option<u64>,
    /// Encodings and modes taken from the latent cache (absent from manifests of earlier
    /// versions).
    #[serde(default)]
    pub reused: Reused,
}
