//! Commit markers (one per class, written create-only) and the merged job manifest.

use serde::{Deserialize, Serialize};

pub const SCHEMA_VERSION: u32 = 1;

/// One committed file of a class.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    /// Name inside the class folder (`3.png`, `modes.npy`).
    pub name: String,
    pub sha256: String,
    pub bytes: u64,
}

/// Per-stage seconds of one class.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StageSeconds {
    pub decode: f64,
    pub encode: f64,
    pub kmeans: f64,
    pub dit: f64,
    pub guidance: f64,
    pub vae_decode: f64,
    pub png: f64,
}

impl StageSeconds {
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

/// The commit marker `shards/<wnid>.json`: a class is done iff this exists and names the job's
/// fingerprint. It lists every file of the attempt that won, so publishing can be verified.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassMarker {
    pub schema_version: u32,
    pub job_id: String,
    pub fingerprint: String,
    pub attempt_id: String,
    pub worker_id: String,
    pub wnid: String,
    pub label: i64,
    pub class_index: u64,
    pub images: Vec<FileDigest>,
    pub modes: FileDigest,
    pub real_images: u64,
    pub timings: StageSeconds,
    pub committed_unix_ms: u64,
    /// The class's latents came from the latent cache (no decode or VAE encode).
    #[serde(default)]
    pub latent_cache_hit: bool,
    /// Entries of the class folder the listing rule left out (hidden, not images).
    #[serde(default)]
    pub skipped: crate::imagefolder::Skipped,
}

/// One class of the job manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ManifestClass {
    pub wnid: String,
    pub label: i64,
    pub images: Vec<FileDigest>,
    pub modes_sha256: String,
    pub attempt_id: String,
}

/// `manifest.json`, written when every class is committed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobManifest {
    pub schema_version: u32,
    pub job_id: String,
    pub fingerprint: String,
    pub spec: crate::job::JobSpec,
    pub model_fingerprints: std::collections::BTreeMap<String, String>,
    pub classes: Vec<ManifestClass>,
    pub images: u64,
    pub timings: StageSeconds,
    pub created_unix_ms: u64,
    pub finished_unix_ms: u64,
}
