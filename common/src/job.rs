//! Job specs: the TOML a user submits (`deny_unknown_fields`, every invalid field reported by
//! name), its resolution into an immutable plan (absolute paths, the class list with DiT labels,
//! model fingerprints, shards) and the fingerprint that decides whether two runs are the same job.

use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::classes;
use crate::store::resolve;

/// Errors of parsing, validating and resolving a job spec.
#[derive(Debug, Error)]
pub enum JobError {
    /// The text is not TOML at all (the message gives the line).
    #[error("job spec is not valid TOML: {0}")]
    Toml(String),
    /// The text is TOML, but a field is unknown, missing or of the wrong type (the message gives
    /// the line and names the field).
    #[error("invalid job spec: {0}")]
    Shape(String),
    /// One or more fields are invalid; every problem is listed.
    #[error("invalid job spec:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<FieldError>),
    /// The spec is larger than any spec needs to be ([`MAX_SPEC_BYTES`]): read, it would take
    /// memory and time out of all proportion before any of it could be refused.
    #[error(
        "job spec is {bytes} bytes ({:.1} MiB), more than the {} MiB a spec may be: list classes in a class-list file \
         (`classes = {{ file = \"classes.txt\" }}`), and vary settings in a [sweep] with lists of values, not every variant written out",
        *bytes as f64 / 1048576.0,
        max >> 20
    )]
    TooLarge {
        /// The spec's size.
        bytes: usize,
        /// [`MAX_SPEC_BYTES`].
        max: usize,
    },
    /// A file the spec names (the class-list file) cannot be read.
    #[error("cannot read {what} `{path}`")]
    Read {
        /// What the file is (`class list`).
        what: &'static str,
        /// The file's path.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// The largest job spec mgd3 reads, in bytes: ImageNet-21K's 21,841 classes listed inline take
/// ~300 KB, and a sweep at its hard cap of variants written out one by one ~1 MB.
pub const MAX_SPEC_BYTES: usize = 4 << 20;

/// [`JobError::TooLarge`] for a spec over [`MAX_SPEC_BYTES`].
///
/// # Errors
/// [`JobError::TooLarge`].
pub fn refuse_oversized(text: &str) -> Result<(), JobError> {
    if text.len() > MAX_SPEC_BYTES {
        return Err(JobError::TooLarge { bytes: text.len(), max: MAX_SPEC_BYTES });
    }
    Ok(())
}

/// A TOML error as `line N: message`, without the parser's source excerpt.
fn located(text: &str, error: &toml::de::Error) -> String {
    let mut message = plain_types(error.message().trim_end());
    if message.starts_with("invalid type: sequence") {
        // A list where one value goes: most likely several values meant to be tried.
        message.push_str(
            "; to run several values, give one here and list them in a [sweep] table (`[sweep]` then \
             `guidance_scale = [0.05, 0.1]`, see the README's Sweeps)",
        );
    }
    match error.span() {
        Some(span) => {
            let start = span.start.min(text.len());
            let line = text[..start].matches('\n').count() + 1;
            // The line itself names the field (`ipc = "ten"`), which a type error's message does not.
            let source = text.lines().nth(line - 1).unwrap_or_default().trim();
            format!("line {line} (`{source}`): {message}")
        }
        None => message,
    }
}

/// serde's Rust type names in a message (`expected usize`) in words a spec's author reads.
fn plain_types(message: &str) -> String {
    let mut out = message.to_owned();
    for (rust, words) in [
        ("expected usize", "expected a whole number"),
        ("expected u64", "expected a whole number"),
        ("expected u32", "expected a whole number"),
        ("expected i64", "expected a whole number"),
        ("expected f64", "expected a number"),
        ("expected f32", "expected a number"),
    ] {
        out = out.replace(rust, words);
    }
    out
}

/// The most field-level problems of one spec reported together.
const MAX_SHAPE_PROBLEMS: usize = 32;

/// `text` with the line holding byte `at` emptied (its newline kept); `None` when it already is.
fn blank_line(text: &str, at: usize) -> Option<String> {
    let at = at.min(text.len());
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    if text[start..end].trim().is_empty() {
        return None;
    }
    Some(format!("{}{}", &text[..start], &text[end..]))
}

/// `text` with the line holding byte `at` replaced by `with` (its newline kept).
fn replace_line(text: &str, at: usize, with: &str) -> String {
    let at = at.min(text.len());
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    format!("{}{with}{}", &text[..start], &text[end..])
}

/// The key the line holding byte `at` sets (`key = value`), unquoted; `None` for another line.
fn line_key(text: &str, at: usize) -> Option<String> {
    let at = at.min(text.len());
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    let (key, _) = text[start..end].split_once('=')?;
    let key = key.trim().trim_matches(|c| c == '"' || c == '\'');
    (!key.is_empty() && !key.starts_with('[')).then(|| key.to_owned())
}

/// A stand-in line for a required setting whose own line was set aside for its problem (a wrong
/// type, a misspelt key), so that the spec reads on and the other settings' problems are found
/// in the same pass, instead of a "missing field" for the setting just named. Only top-level
/// settings, which is where these keys live.
fn stand_in(key: &str) -> Option<&'static str> {
    match key {
        "dataset" => Some("dataset = \"stand-in\""),
        "classes" => Some("classes = \"all\""),
        "ipc" => Some("ipc = 1"),
        _ => None,
    }
}

/// The error located in `text`, and for serde's "unknown field `y`, expected one of …" with an
/// expected name close to `y` (a typo: at most two edits, or a third of its length), "did you mean
/// `x`?" in place of the list, with `x`.
fn with_suggestion(text: &str, error: &toml::de::Error) -> (String, Option<String>) {
    let located = located(text, error);
    let Some(rest) = error.message().strip_prefix("unknown field `") else { return (located, None) };
    let Some((unknown, expected)) = rest.split_once('`') else { return (located, None) };
    let names = expected.split('`').skip(1).step_by(2);
    // A name shortened by a word (`vae_fingerprint`) means the names holding all its words
    // (`vae_encoder_fingerprint`, `vae_decoder_fingerprint`), not the nearest spelling
    // (`dit_fingerprint`).
    let words: Vec<&str> = unknown.split('_').filter(|w| !w.is_empty()).collect();
    let holding: Vec<&str> = names
        .clone()
        .filter(|name| {
            // A plural or singular slip (`vae_fingerprints`) is the same word.
            let same = |w: &str, part: &str| {
                w == part || w.strip_suffix('s') == Some(part) || part.strip_suffix('s') == Some(w)
            };
            words.len() >= 2 && words.iter().all(|w| name.split('_').any(|part| same(w, part)))
        })
        .collect();
    let head = located.split(", expected one of").next().unwrap_or(&located).to_owned();
    match holding.as_slice() {
        [one] => return (format!("{head}; did you mean `{one}`?"), Some((*one).to_owned())),
        [a, b] => return (format!("{head}; did you mean `{a}` or `{b}`?"), None),
        _ => {}
    }
    // Case alone (`IPC`) is as close as a name gets.
    let distance = |name: &str| if unknown.eq_ignore_ascii_case(name) { 0 } else { edit_distance(unknown, name) };
    match names.map(|name| (distance(name), name)).min() {
        Some((distance, name)) if distance <= 2.max(unknown.len() / 3) => {
            (format!("{head}; did you mean `{name}`?"), Some(name.to_owned()))
        }
        _ => (located, None),
    }
}

/// Levenshtein distance between two short strings.
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substituted = previous + usize::from(ca != *cb);
            previous = row[j + 1];
            row[j + 1] = substituted.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

/// One invalid field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// The field's dotted name (`ipc`, `sampling.steps`).
    pub field: String,
    /// What is wrong with its value.
    pub problem: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}`: {}", self.field, self.problem)
    }
}

/// Which classes a job distils.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ClassSelection {
    /// `"all"` (every class folder of the dataset, sorted) or a shipped subset: `imagenet1k`,
    /// `imagenette`, `imagewoof`, `imagenet100`, `imageidc`.
    Named(String),
    /// Explicit class folder names, in order.
    List(Vec<String>),
    /// A file with one class folder name per line.
    File {
        /// Path of the file (relative to job.toml until [`JobSpec::resolve_paths`]).
        file: String,
    },
}

/// How DiT labels are assigned to classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LabelScheme {
    /// Label = index of the wnid in the sorted ImageNet-1K synsets (DiT-XL/2).
    #[default]
    Imagenet1k,
    /// Label = position of the class in the job's class list (models trained on other datasets).
    Position,
    /// Label = index of the class among all class folders of the dataset, sorted (torchvision
    /// `ImageFolder`'s `class_to_idx`, hidden folders skipped): what a DiT trained on the whole
    /// ImageFolder expects, also when the job lists only some of its classes.
    Folder,
}

/// A setting a user can give both in a job spec and on the worker's command line, so that an
/// error about it can name it the way the user wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Setting {
    /// Images per class.
    Ipc,
    /// Denoising steps.
    Steps,
    /// Mode-guidance strength λ.
    GuidanceScale,
    /// Steps with mode guidance (t_stop).
    StopGuidance,
    /// Classifier-free guidance scale.
    CfgScale,
    /// ε channels classifier-free guidance mixes.
    CfgChannels,
    /// DDIM's η.
    Eta,
}

/// A setting whose value the models or the other settings rule out, named as the user wrote it.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{}: {problem}", setting.name(*origin))]
pub struct InvalidSetting {
    /// Which setting.
    pub setting: Setting,
    /// Where the user gave it (decides its name in the message).
    pub origin: SettingSource,
    /// The value as given.
    pub value: String,
    /// What is wrong with it, quoting the value.
    pub problem: String,
}

impl InvalidSetting {
    /// A problem with `setting` at `value`, as given in a job spec.
    pub fn new(setting: Setting, value: impl std::fmt::Display, problem: String) -> Self {
        InvalidSetting { setting, origin: SettingSource::JobSpec, value: value.to_string(), problem }
    }

    /// The same error about a value given on the command line (named by its flag).
    pub fn from_command_line(self) -> Self {
        InvalidSetting { origin: SettingSource::CommandLine, ..self }
    }
}

/// Where a setting came from: decides how an error names it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SettingSource {
    /// A job spec (TOML): `sampling.cfg_channels`.
    #[default]
    JobSpec,
    /// The worker's command line: `--cfg-channels`.
    CommandLine,
}

impl Setting {
    /// The setting's key in a job spec (`ipc`, `sampling.steps`, ...).
    pub fn spec_key(self) -> &'static str {
        match self {
            Setting::Ipc => "ipc",
            Setting::Steps => "sampling.steps",
            Setting::GuidanceScale => "sampling.guidance_scale",
            Setting::StopGuidance => "sampling.stop_guidance",
            Setting::CfgScale => "sampling.cfg_scale",
            Setting::CfgChannels => "sampling.cfg_channels",
            Setting::Eta => "sampling.eta",
        }
    }

    /// The worker's command-line flag for the setting (`--ipc`, `--steps`, ...).
    pub fn flag(self) -> &'static str {
        match self {
            Setting::Ipc => "--ipc",
            Setting::Steps => "--steps",
            Setting::GuidanceScale => "--guidance-scale",
            Setting::StopGuidance => "--stop-guidance",
            Setting::CfgScale => "--cfg-scale",
            Setting::CfgChannels => "--cfg-channels",
            Setting::Eta => "--eta",
        }
    }

    /// The name as a user of `source` wrote it.
    pub fn name(self, source: SettingSource) -> &'static str {
        match source {
            SettingSource::JobSpec => self.spec_key(),
            SettingSource::CommandLine => self.flag(),
        }
    }
}

/// The `[sampling]` table: MGD³'s guidance and the DiT sampler. Defaults are the paper's, and
/// live here only: the worker's command line and the sampler take this same type.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingSpec {
    /// λ, the mode-guidance scale (default 0.1; finite, ≥ 0).
    #[serde(default = "default_guidance_scale")]
    pub guidance_scale: f32,
    /// t_stop: mode guidance applies while the respaced step index i (S−1 down to 0) is above it;
    /// `steps` turns it off (default 25, at most `steps`).
    #[serde(default = "default_stop_guidance")]
    pub stop_guidance: usize,
    /// Classifier-free guidance scale s (default 4.0; 1.0 gives the conditional prediction).
    #[serde(default = "default_cfg_scale")]
    pub cfg_scale: f32,
    /// How many leading ε channels CFG mixes: 3 reproduces the reference DiT's quirk (default),
    /// 4 is standard CFG; 1..=16.
    #[serde(default = "default_cfg_channels")]
    pub cfg_channels: usize,
    /// Sampling steps S, respaced from the model's training timesteps (default 50, 1..=1000).
    #[serde(default = "default_steps")]
    pub steps: usize,
    /// The reverse step: `"ddpm"` (the reference) or `"ddim"` (the paper's Algorithm 1).
    /// Absent from the serialised spec when DDPM, so older jobs keep their fingerprints.
    #[serde(default, skip_serializing_if = "SamplerKind::is_ddpm")]
    pub sampler: SamplerKind,
    /// DDIM's η in `[0, 1]` (0 = deterministic, 1 = DDPM-like noise; default 0); only with
    /// `sampler = "ddim"`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub eta: f32,
}

fn is_zero(value: &f32) -> bool {
    *value == 0.0
}

/// The stride of ADM's `space_timesteps(train, "ddim{steps}")`: the smallest s with exactly
/// `steps` timesteps in `range(0, train, s)` (T = 1000, S = 50: 20). `None` when there is none
/// (S = 400 of T = 1000), a setting DDIM cannot run.
pub fn ddim_stride(train: usize, steps: usize) -> Option<usize> {
    (1..train.max(1)).find(|stride| train.div_ceil(*stride) == steps)
}

/// The reverse step of a sampling run (`[sampling] sampler`, the worker's `--sampler`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SamplerKind {
    /// The reference DDPM step (MGD3-SPEC §2.2).
    #[default]
    Ddpm,
    /// DDIM with mode guidance, the paper's Algorithm 1.
    Ddim,
}

impl SamplerKind {
    fn is_ddpm(&self) -> bool {
        *self == SamplerKind::Ddpm
    }

    /// Why `eta` does not fit this sampler, if it does not: η is a number in `[0, 1]` and only
    /// DDIM has one.
    pub fn eta_problem(&self, eta: f32) -> Option<String> {
        if !eta.is_finite() || !(0.0..=1.0).contains(&eta) {
            Some(format!("{eta} is outside 0..=1"))
        } else if eta != 0.0 && *self == SamplerKind::Ddpm {
            Some(format!(
                "{eta} applies only to the DDIM sampler (`sampler = \"ddim\"` in a job, `--sampler ddim` for a worker)"
            ))
        } else {
            None
        }
    }
}

impl std::str::FromStr for SamplerKind {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "ddpm" => Ok(SamplerKind::Ddpm),
            "ddim" => Ok(SamplerKind::Ddim),
            other => Err(format!("unknown sampler `{other}` (ddpm or ddim)")),
        }
    }
}

impl std::fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SamplerKind::Ddpm => "ddpm",
            SamplerKind::Ddim => "ddim",
        })
    }
}

fn default_guidance_scale() -> f32 {
    0.1
}
fn default_stop_guidance() -> usize {
    25
}
fn default_cfg_scale() -> f32 {
    4.0
}
fn default_cfg_channels() -> usize {
    3
}
fn default_steps() -> usize {
    50
}

/// The largest classifier-free guidance scale a job may set: the reference samples at 4 (DiT's
/// `sample.py`), FID sweeps go to ~10; 10⁶ turned every sample into noise with no error.
pub const MAX_CFG_SCALE: f32 = 50.0;

impl SamplingSpec {
    /// Every problem these settings have on their own (the models may rule out more), named as
    /// in a job spec; the worker's command line renames them to its flags.
    pub fn problems(&self) -> Vec<InvalidSetting> {
        let mut problems = Vec::new();
        if self.steps == 0 || self.steps > 1000 {
            problems.push(InvalidSetting::new(
                Setting::Steps,
                self.steps,
                format!("{} is outside 1..=1000", self.steps),
            ));
        }
        if self.stop_guidance > self.steps {
            let problem = format!("{} exceeds the {} sampling steps", self.stop_guidance, self.steps);
            problems.push(InvalidSetting::new(Setting::StopGuidance, self.stop_guidance, problem));
        }
        if !(1..=16).contains(&self.cfg_channels) {
            let problem = format!("{} is not a channel count (3 = reference DiT, 4 = standard)", self.cfg_channels);
            problems.push(InvalidSetting::new(Setting::CfgChannels, self.cfg_channels, problem));
        }
        if !self.guidance_scale.is_finite() || self.guidance_scale < 0.0 {
            let problem = format!("{} must be a finite number ≥ 0", self.guidance_scale);
            problems.push(InvalidSetting::new(Setting::GuidanceScale, self.guidance_scale, problem));
        }
        if !self.cfg_scale.is_finite() || !(0.0..=MAX_CFG_SCALE).contains(&self.cfg_scale) {
            problems.push(InvalidSetting::new(
                Setting::CfgScale,
                self.cfg_scale,
                format!(
                    "{} is outside 0..={MAX_CFG_SCALE} (1 is the conditional model alone, 4 the reference's; far \
                     above, the scaled difference of the two predictions swamps the image and the samples are noise)",
                    self.cfg_scale
                ),
            ));
        }
        if let Some(problem) = self.sampler.eta_problem(self.eta) {
            problems.push(InvalidSetting::new(Setting::Eta, self.eta, problem));
        }
        problems
    }
}

impl Default for SamplingSpec {
    fn default() -> Self {
        SamplingSpec {
            guidance_scale: default_guidance_scale(),
            stop_guidance: default_stop_guidance(),
            cfg_scale: default_cfg_scale(),
            cfg_channels: default_cfg_channels(),
            steps: default_steps(),
            sampler: SamplerKind::Ddpm,
            eta: 0.0,
        }
    }
}

/// The `[models]` table: the three ONNX files MGD³ runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// The class-conditional DiT (local path or object-store URL).
    pub dit: String,
    /// The VAE encoder (local path or object-store URL).
    pub vae_encoder: String,
    /// The VAE decoder (local path or object-store URL).
    pub vae_decoder: String,
    /// Expected `sha256:<hex>` of each file; computed at submit when absent.
    #[serde(default)]
    pub dit_fingerprint: Option<String>,
    /// Expected `sha256:<hex>` of the VAE encoder; computed at submit when absent.
    #[serde(default)]
    pub vae_encoder_fingerprint: Option<String>,
    /// Expected `sha256:<hex>` of the VAE decoder; computed at submit when absent.
    #[serde(default)]
    pub vae_decoder_fingerprint: Option<String>,
}

/// The job spec as written in job.toml.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Human name; the job id is `<name>-<fingerprint prefix>`.
    #[serde(default)]
    pub name: Option<String>,
    /// ImageFolder root (local path or object-store URL).
    pub dataset: String,
    /// Which classes to distil.
    pub classes: ClassSelection,
    /// How classes get their DiT labels (default `imagenet1k`).
    #[serde(default)]
    pub labels: LabelScheme,
    /// Images per class (IPC): the k of k-means and the samples drawn per class (≥ 1).
    pub ipc: usize,
    /// The job seed every RNG stream derives from (k-means++ and sample noise; default 0).
    #[serde(default)]
    pub seed: u64,
    /// Where job outputs go (`<output>/jobs/<job>/...`); default: the coordinator's store.
    #[serde(default)]
    pub output: Option<String>,
    /// Classes per shard (one lease). Absent: [`default_classes_per_shard`] of `ipc` and
    /// [`DEFAULT_MAX_BATCH`], so that a shard's samples fill the worker's DiT calls and its
    /// classes overlap in the worker's pipeline. Read it through [`JobSpec::shard_size`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes_per_shard: Option<usize>,
    /// Seconds a shard lease lasts without renewal before the shard is handed out again
    /// (default 120, at least 5).
    #[serde(default = "default_lease_timeout")]
    pub lease_timeout_s: u64,
    /// Leases a shard may take before it fails for good (default 3, at least 1).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// The `[sampling]` table.
    #[serde(default)]
    pub sampling: SamplingSpec,
    /// The `[models]` table.
    pub models: ModelSpec,
    /// Cache per-class VAE latents: `true` (under `<output>/cache`) or a folder / store URL.
    /// Jobs over the same dataset and VAE then skip decoding and encoding.
    #[serde(default)]
    pub latent_cache: Option<LatentCache>,
    /// Write a contact sheet per committed class (`contact_sheets/<wnid>.png`: the first IPC
    /// real images, the decoded modes and the samples, one row each). Made from tensors already
    /// in memory; `false` skips the VAE decode of the modes and the PNG.
    #[serde(default = "default_contact_sheet", skip_serializing_if = "is_true")]
    pub contact_sheet: bool,
    /// What tells a class's data changed (not part of the fingerprint): `"names"` (default) the
    /// images' names and sizes, `"content"` also every image's sha256, read at submit and resume
    /// (a full read of the dataset) to catch files rewritten in place at the same size.
    #[serde(default, skip_serializing_if = "DataFingerprint::is_default")]
    pub data_fingerprint: DataFingerprint,
}

/// The `data_fingerprint` setting: what a class's recorded data is compared by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFingerprint {
    /// Relative names and sizes: a listing, no reads.
    #[default]
    Names,
    /// Names, sizes and every image's sha256: reads the whole dataset.
    Content,
}

impl DataFingerprint {
    fn is_default(&self) -> bool {
        *self == DataFingerprint::Names
    }
}

/// One class whose input data changed since its job recorded it ([`ClassRef::listing`], or the
/// marker of its commit).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataChange {
    /// The class folder name.
    pub wnid: String,
    /// The data the job recorded (or the commit was made from).
    pub then: crate::imagefolder::ListingSummary,
    /// The data now.
    pub now: crate::imagefolder::ListingSummary,
    /// The class was committed from the old data.
    pub was_committed: bool,
}

impl std::fmt::Display for DataChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` ({}{})",
            self.wnid,
            self.then.change_to(&self.now),
            if self.was_committed { "; committed from the old data" } else { "" }
        )
    }
}

fn default_contact_sheet() -> bool {
    true
}

fn is_true(value: &bool) -> bool {
    *value
}

/// The `latent_cache` setting.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LatentCache {
    /// `true`: cache under `<output>/cache`; `false`: no cache.
    Enabled(bool),
    /// Cache in this folder or object-store URL.
    At(String),
}

/// The workers' default `--dit-rows` (`--max-batch`): rows per DiT call
/// ([`crate::batch::DEFAULT_DIT_ROWS`]).
pub const DEFAULT_MAX_BATCH: usize = crate::batch::DEFAULT_DIT_ROWS;

/// Fewest classes a default shard holds: reading and decoding one class overlaps the
/// encoding and sampling of another only within a shard.
pub const MIN_DEFAULT_CLASSES_PER_SHARD: usize = 4;

/// GPU time of one distilled image in units of one real image decoded and VAE-encoded: an H200
/// distilled 7.17 images/s (50 DDPM steps with CFG pairs, VAE decode; README "GPU") and its
/// data stage reads and encodes ~600 real images/s (314 decodes/s per core, two cores per GPU).
/// Only the order of leases depends on it (see [`ResolvedJob::shard_cost`]).
pub const SAMPLE_COST_IN_REAL_IMAGES: u64 = 84;

/// The default shard size: enough classes that the shard's `ipc`-sample classes fill at least
/// one DiT call of `dit_rows` rows ([`crate::batch::samples_per_call`] samples), and at least
/// [`MIN_DEFAULT_CLASSES_PER_SHARD`]; then, up to twice that, the size whose samples fill the
/// shard's DiT calls best ([`packed_classes`]), because every call costs a fixed overhead
/// whatever its rows. IPC 10 at 64 rows: 6 classes (60 samples: calls of 32 and 28, not 32 and
/// 8); IPC 50 at 256 rows: 5 classes (250 samples in two calls of 128 and 122, not 200 in 128
/// and 72); IPC 10 at 512 rows: 51 classes (510 of 512).
pub fn default_classes_per_shard(ipc: usize, dit_rows: usize) -> usize {
    let base = crate::batch::samples_per_call(dit_rows).div_ceil(ipc.max(1)).max(MIN_DEFAULT_CLASSES_PER_SHARD);
    packed_classes(ipc, dit_rows, base, 2 * base)
}

/// How full a shard of `classes` classes at `ipc` keeps its DiT calls of `dit_rows` rows:
/// samples ÷ (calls × samples per call), in (0, 1].
pub fn call_fill(classes: usize, ipc: usize, dit_rows: usize) -> f64 {
    let per_call = crate::batch::samples_per_call(dit_rows);
    let samples = (classes * ipc.max(1)).max(1);
    samples as f64 / (samples.div_ceil(per_call) * per_call) as f64
}

/// The class counts in `from..=to` whose shards fill their DiT calls within 1 % of the best
/// of the range ([`call_fill`]), in increasing order (never empty).
fn best_filling(ipc: usize, dit_rows: usize, from: usize, to: usize) -> Vec<usize> {
    let (from, to) = (from.max(1), to.max(from.max(1)));
    let best = (from..=to).map(|k| call_fill(k, ipc, dit_rows)).fold(0.0, f64::max);
    (from..=to).filter(|&k| call_fill(k, ipc, dit_rows) >= best - 0.01).collect()
}

/// The class count in `from..=to` whose shard fills its DiT calls best ([`call_fill`]); the
/// smallest of the best within 1 % of each other, so shards stay short.
pub fn packed_classes(ipc: usize, dit_rows: usize, from: usize, to: usize) -> usize {
    best_filling(ipc, dit_rows, from, to)[0]
}

/// The class count in `⌈at_most ÷ 2⌉..=at_most` whose shard fills its DiT calls best
/// ([`call_fill`]); the largest of the best within 1 % of each other, so the taper keeps its
/// shards as few as it can.
pub fn packed_classes_down(ipc: usize, dit_rows: usize, at_most: usize) -> usize {
    let at_most = at_most.max(1);
    *best_filling(ipc, dit_rows, at_most.div_ceil(2), at_most).last().expect("never empty")
}

fn default_lease_timeout() -> u64 {
    120
}
fn default_max_attempts() -> u32 {
    3
}

/// A class whose DiT label is outside the DiT's classes (labels `0..classes`; the null class of
/// classifier-free guidance is no class).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("class `{class}`: label {label} is outside the DiT's {classes} classes (labels 0 to {})", classes.saturating_sub(1))]
pub struct LabelOutOfRange {
    /// The class (wnid), as the job or the command line names it.
    pub class: String,
    /// Its label.
    pub label: i64,
    /// The DiT's number of classes.
    pub classes: i64,
}

/// The one label check of mgd3 (submit, the worker before a shard, `worker sample`).
///
/// # Errors
/// [`LabelOutOfRange`] for a label outside `0..classes`.
pub fn check_label(class: &str, label: i64, classes: i64) -> Result<(), LabelOutOfRange> {
    if (0..classes).contains(&label) {
        Ok(())
    } else {
        Err(LabelOutOfRange { class: class.to_owned(), label, classes })
    }
}

/// One class of a resolved job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassRef {
    /// The class folder name (an ImageNet wnid for ImageNet jobs).
    pub wnid: String,
    /// The DiT class label, assigned by the job's [`LabelScheme`].
    pub label: i64,
    /// Position of the class in the job's class list; seeds its RNG streams ([`crate::seed`]).
    pub class_index: u64,
    /// The class's listing as submit saw it (or as a later `--accept-data-changes` recorded it): a
    /// worker distils the class only while its names and sizes are the same (jobs submitted
    /// before this was recorded have none and are not checked). Not part of the fingerprint: a
    /// job's identity is its spec and classes, and each class's data is compared on its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listing: Option<crate::imagefolder::ListingSummary>,
}

/// A job after submit: spec with absolute locations and fingerprints, class list, shard plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResolvedJob {
    /// The job id: [`job_id`] of the spec, or the one given at submit.
    pub job_id: String,
    /// The spec with absolute locations and every model fingerprint filled in.
    pub spec: JobSpec,
    /// Every class, in the job's order.
    pub classes: Vec<ClassRef>,
    /// Shard i holds `classes[shards[i].0 .. shards[i].1]`.
    pub shards: Vec<(usize, usize)>,
    /// [`JobSpec::fingerprint`] of the spec and classes (`sha256:<hex>`). Jobs submitted by
    /// mgd3 before per-class data fingerprints have [`JobSpec::fingerprint_with_data`] here (it
    /// also covered every listing with modification times); see [`ResolvedJob::identity`].
    pub fingerprint: String,
    /// When the job was submitted, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
}

impl ResolvedJob {
    /// The classes of shard `shard`.
    ///
    /// # Panics
    /// If `shard` is not a shard of the job.
    pub fn shard_classes(&self, shard: usize) -> &[ClassRef] {
        let (from, to) = self.shards[shard];
        &self.classes[from..to]
    }

    /// The job's identity without its data, [`JobSpec::fingerprint`]: what two submissions of
    /// one experiment share, whatever version of mgd3 recorded [`ResolvedJob::fingerprint`].
    pub fn identity(&self) -> String {
        self.spec.fingerprint(&self.classes)
    }

    /// Distilled images the job writes: classes × IPC.
    pub fn images_total(&self) -> u64 {
        (self.classes.len() * self.spec.ipc) as u64
    }

    /// The relative GPU time of shard `shard`, in real images decoded and VAE-encoded: each
    /// class's real images as submit listed them (0 where the job recorded none) plus IPC ×
    /// [`SAMPLE_COST_IN_REAL_IMAGES`]. What the scheduler orders leases by (costliest first).
    ///
    /// # Panics
    /// If `shard` is not a shard of the job.
    pub fn shard_cost(&self, shard: usize) -> u64 {
        let sampling = self.spec.ipc as u64 * SAMPLE_COST_IN_REAL_IMAGES;
        self.shard_classes(shard).iter().map(|c| c.listing.as_ref().map_or(0, |l| l.images) + sampling).sum()
    }
}

impl JobSpec {
    /// Where latents are cached, if anywhere.
    pub fn latent_cache_url(&self) -> Option<String> {
        match &self.latent_cache {
            Some(LatentCache::At(url)) => Some(url.clone()),
            Some(LatentCache::Enabled(true)) => {
                self.output.as_ref().map(|out| format!("{}/cache", out.trim_end_matches('/')))
            }
            _ => None,
        }
    }

    /// Every location of the spec with the setting that names it: `dataset`, the class-list
    /// file, `output`, `latent_cache` and the three models (after [`JobSpec::resolve_paths`]).
    pub fn locations(&self) -> Vec<(&'static str, String)> {
        let mut all = vec![("dataset", self.dataset.clone())];
        if let ClassSelection::File { file } = &self.classes {
            all.push(("classes.file", file.clone()));
        }
        if let Some(output) = &self.output {
            all.push(("output", output.clone()));
        }
        if let Some(cache) = self.latent_cache_url() {
            all.push(("latent_cache", cache));
        }
        all.push(("models.dit", self.models.dit.clone()));
        all.push(("models.vae_encoder", self.models.vae_encoder.clone()));
        all.push(("models.vae_decoder", self.models.vae_decoder.clone()));
        all
    }

    /// The settings that write inside the dataset: `output` and `latent_cache` when equal to
    /// the `dataset` root or under it (after [`JobSpec::resolve_paths`]; local paths compared with
    /// their links resolved, URLs as written). A job writing there puts `jobs/` (or `cache/`)
    /// beside the class folders, so the next job over `classes = "all"` distils it as a class —
    /// or is refused for a label outside the DiT's, or reads its own outputs back as real images
    /// when the folder is a class's.
    pub fn inside_dataset_problems(&self) -> Vec<FieldError> {
        self.inside_dataset_problems_with(None)
    }

    /// [`JobSpec::inside_dataset_problems`], with the coordinator's state store too (`--store`,
    /// named as such): it writes `coordinator.lock` and `jobs/` where it is.
    pub fn inside_dataset_problems_with(&self, store: Option<&str>) -> Vec<FieldError> {
        let Some(dataset) = comparable_location(&self.dataset) else { return Vec::new() };
        let mut problems = Vec::new();
        for (field, location) in [
            ("output", self.output.clone()),
            ("latent_cache", self.latent_cache_url()),
            ("--store", store.map(str::to_owned)),
        ] {
            let Some(location) = location else { continue };
            if comparable_location(&location).is_some_and(|at| at.starts_with(&dataset)) {
                problems.push(FieldError {
                    field: field.into(),
                    problem: format!(
                        "`{}` is inside the dataset `{}`: the job would write its folders beside the class folders, \
                         where the next job over this dataset reads them as a class; put it outside the dataset",
                        location.escape_debug(),
                        self.dataset.escape_debug()
                    ),
                });
            }
        }
        problems
    }

    /// Checks that every local location of the spec lies inside one of `allowed` (absolute,
    /// normalised folders; symbolic links resolved where the path exists). Object-store URLs
    /// are governed by their credentials, not by this. All violations are reported at once.
    ///
    /// # Errors
    /// [`JobError::Invalid`] naming each setting outside the allowed folders.
    pub fn check_local_paths(&self, allowed: &[std::path::PathBuf]) -> Result<(), JobError> {
        let mut errors = Vec::new();
        for (field, location) in self.locations() {
            let local = match location.strip_prefix("file://") {
                Some(rest) => {
                    url::Url::parse(&location).ok().and_then(|u| u.to_file_path().ok()).unwrap_or(rest.into())
                }
                None if crate::store::is_url(&location) => continue,
                None => std::path::PathBuf::from(crate::store::resolve(&location, std::path::Path::new("/"))),
            };
            let real = real_path(&local);
            if !allowed.iter().any(|root| real.starts_with(root)) {
                errors.push(FieldError {
                    field: field.into(),
                    problem: format!(
                        "`{}`{} is outside the folders this coordinator may use ({}); start it with --allow-path for that folder",
                        location,
                        if real != local { format!(" (resolves to `{}`)", real.display()) } else { String::new() },
                        allowed.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                    ),
                });
            }
        }
        if errors.is_empty() { Ok(()) } else { Err(JobError::Invalid(errors)) }
    }

    /// Parses job.toml text; unknown fields and type errors name the field and its line.
    ///
    /// # Errors
    /// [`JobError::Toml`] for text that is not TOML; [`JobError::Shape`] for TOML that is not a
    /// job spec (an unknown, missing or mistyped field).
    pub fn from_toml(text: &str) -> Result<Self, JobError> {
        refuse_oversized(text)?;
        // Two passes, so that valid TOML with a wrong field is never called invalid TOML.
        toml::from_str::<toml::Table>(text).map_err(|e| JobError::Toml(located(text, &e)))?;
        // Every field-level problem at once: each one's line is blanked (kept as an empty line, so
        // later messages keep their line numbers) and the spec read again, until it reads or the
        // problems left are not tied to one line (a missing field).
        let mut problems: Vec<(usize, String)> = Vec::new();
        let mut suggested = Vec::new();
        let mut current = text.to_owned();
        for _ in 0..MAX_SHAPE_PROBLEMS {
            let error = match toml::from_str::<JobSpec>(&current) {
                Ok(spec) if problems.is_empty() => return Ok(spec),
                Ok(rest) => {
                    // The other settings' own problems (a value out of range), said with these.
                    if let Err(JobError::Invalid(invalid)) = rest.validate() {
                        let leaf = |field: &str| field.rsplit('.').next().unwrap_or(field).to_owned();
                        problems.extend(
                            invalid
                                .into_iter()
                                .filter(|e| !suggested.contains(&leaf(&e.field)))
                                .map(|e| (usize::MAX - 1, e.to_string())),
                        );
                    }
                    break;
                }
                Err(error) => error,
            };
            let message = error.message().trim_end();
            if let Some(field) = message.strip_prefix("missing field `").and_then(|m| m.split('`').next()) {
                // Not a line's fault; and no news when a misspelling of it was named already.
                if !suggested.iter().any(|s| s == field) {
                    problems.push((usize::MAX, message.to_owned()));
                }
                break;
            }
            let line =
                error.span().map_or(0, |span| current[..span.start.min(current.len())].matches('\n').count() + 1);
            let (text, suggestion) = with_suggestion(&current, &error);
            // The setting this line was for: said now, so that its absence is not said again. A
            // misspelling of a setting the spec also sets correctly (`ipx` beside `ipc`) is only
            // an unknown key: the setting stays the other line's, with its own problems.
            let set = |key: &str| toml::from_str::<toml::Table>(&current).is_ok_and(|table| table.contains_key(key));
            let key = match suggestion {
                Some(name) if set(&name) => None,
                suggestion => suggestion.or_else(|| error.span().and_then(|span| line_key(&current, span.start))),
            };
            let stood_in = key.as_deref().and_then(stand_in);
            suggested.extend(key);
            problems.push((line, text));
            let next = match (error.span(), stood_in) {
                (Some(span), Some(line)) => Some(replace_line(&current, span.start, line)),
                (span, None) => span.and_then(|span| blank_line(&current, span.start)),
                (None, Some(_)) => None,
            };
            let Some(blanked) = next.filter(|next| *next != current) else { break };
            if toml::from_str::<toml::Table>(&blanked).is_err() {
                break; // the value spans lines: what is left cannot be read on its own
            }
            current = blanked;
        }
        problems.sort();
        problems.dedup();
        Err(JobError::Shape(problems.into_iter().map(|(_, p)| p).collect::<Vec<_>>().join("\n  - ")))
    }

    /// Checks every field and reports all problems at once.
    ///
    /// # Errors
    /// [`JobError::Invalid`] listing every invalid field.
    pub fn validate(&self) -> Result<(), JobError> {
        let mut errors = Vec::new();
        let mut bad = |field: &str, problem: String| errors.push(FieldError { field: field.into(), problem });
        if self.dataset.trim().is_empty() {
            bad("dataset", "is empty: it must name an ImageFolder root (a folder of class folders)".into());
        }
        if self.output.as_deref().is_some_and(|o| o.trim().is_empty()) {
            bad("output", "is empty: name a folder or object-store URL, or leave `output` out".into());
        }
        if self.ipc == 0 {
            bad("ipc", "must be at least 1".into());
        }
        if self.classes_per_shard == Some(0) {
            bad("classes_per_shard", "must be at least 1".into());
        }
        if self.lease_timeout_s < 5 {
            bad("lease_timeout_s", format!("{} s is too short (at least 5 s)", self.lease_timeout_s));
        }
        if self.max_attempts == 0 {
            bad("max_attempts", "must be at least 1".into());
        }
        for problem in self.sampling.problems() {
            bad(problem.setting.spec_key(), problem.problem);
        }
        for (field, value) in [
            ("models.dit", &self.models.dit),
            ("models.vae_encoder", &self.models.vae_encoder),
            ("models.vae_decoder", &self.models.vae_decoder),
        ] {
            if value.trim().is_empty() {
                bad(field, "must name an ONNX file".into());
            }
        }
        for (field, value) in [
            ("models.dit_fingerprint", &self.models.dit_fingerprint),
            ("models.vae_encoder_fingerprint", &self.models.vae_encoder_fingerprint),
            ("models.vae_decoder_fingerprint", &self.models.vae_decoder_fingerprint),
        ] {
            if let Some(v) = value
                && !(v.starts_with("sha256:") && v.len() == 71 && v[7..].chars().all(|c| c.is_ascii_hexdigit()))
            {
                bad(field, format!("`{v}` is not `sha256:<64 hex digits>`"));
            }
        }
        let latent_cache = match &self.latent_cache {
            Some(LatentCache::At(at)) => Some(at),
            _ => None,
        };
        let class_file = match &self.classes {
            ClassSelection::File { file } => Some(file),
            _ => None,
        };
        for (field, value) in [
            ("dataset", Some(&self.dataset)),
            ("output", self.output.as_ref()),
            ("latent_cache", latent_cache),
            ("classes", class_file),
            ("models.dit", Some(&self.models.dit)),
            ("models.vae_encoder", Some(&self.models.vae_encoder)),
            ("models.vae_decoder", Some(&self.models.vae_decoder)),
        ] {
            if let Some(problem) = value.and_then(|v| crate::store::location_problem(v)) {
                bad(field, problem);
            }
        }
        if let ClassSelection::List(list) = &self.classes {
            if list.is_empty() {
                bad("classes", "the list is empty".into());
            }
            for problem in class_name_problems(list) {
                bad("classes", problem);
            }
        }
        if let Some(name) = &self.name
            && (name.is_empty()
                || name.starts_with('.')
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
        {
            bad(
                "name",
                format!(
                    "`{name}` may only use ASCII letters and digits, '-', '_' and '.', and not start with '.' (it \
                     names the job's folder and object keys)"
                ),
            );
        }
        if errors.is_empty() { Ok(()) } else { Err(JobError::Invalid(errors)) }
    }

    /// Makes every location absolute against `base` (the directory of job.toml).
    pub fn resolve_paths(&mut self, base: &Path) {
        self.dataset = resolve(&self.dataset, base);
        if let Some(out) = &self.output {
            self.output = Some(resolve(out, base));
        }
        if let Some(LatentCache::At(url)) = &self.latent_cache {
            self.latent_cache = Some(LatentCache::At(resolve(url, base)));
        }
        if let ClassSelection::File { file } = &self.classes {
            self.classes = ClassSelection::File { file: resolve(file, base) };
        }
        // A fingerprint copied in capitals is the same digest (it was refused against the same
        // hash in small letters).
        for fingerprint in [
            &mut self.models.dit_fingerprint,
            &mut self.models.vae_encoder_fingerprint,
            &mut self.models.vae_decoder_fingerprint,
        ]
        .into_iter()
        .flatten()
        {
            *fingerprint = fingerprint.trim().to_ascii_lowercase();
        }
        for m in [&mut self.models.dit, &mut self.models.vae_encoder, &mut self.models.vae_decoder] {
            *m = resolve(m, base);
        }
    }

    /// The class list: `dataset_classes` is called only for `"all"` (the sorted folder names) and
    /// for `labels = "folder"`.
    ///
    /// # Errors
    /// [`JobError::Invalid`] (field `classes`) for an unknown subset, an empty list, invalid or
    /// repeated names, or a class without a label under the scheme; [`JobError::Read`] when the
    /// class-list file cannot be read; and whatever `dataset_classes` returns.
    pub fn class_list(
        &self,
        dataset_classes: impl FnOnce() -> Result<Vec<String>, JobError>,
    ) -> Result<Vec<ClassRef>, JobError> {
        let invalid = |problem: String| JobError::Invalid(vec![FieldError { field: "classes".into(), problem }]);
        let all = matches!(&self.classes, ClassSelection::Named(name) if name == "all");
        let folders = if all || self.labels == LabelScheme::Folder { Some(dataset_classes()?) } else { None };
        let names: Vec<String> = match &self.classes {
            ClassSelection::Named(name) if name == "all" => folders.clone().unwrap_or_default(),
            ClassSelection::Named(name) => classes::named_subset(name)
                .map_err(|e| invalid(e.to_string()))?
                .into_iter()
                .map(|(w, _)| w.to_owned())
                .collect(),
            ClassSelection::List(list) => list.clone(),
            ClassSelection::File { file } => std::fs::read_to_string(file)
                .map_err(|source| JobError::Read { what: "class list", path: file.clone(), source })?
                // Editors on Windows save a byte-order mark and CRLF line ends.
                .trim_start_matches('\u{feff}')
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned)
                .collect(),
        };
        if names.is_empty() {
            return Err(invalid("resolves to no classes".into()));
        }
        // One validation whatever the source: inline, list file, folder listing or subset.
        let problems = class_name_problems(&names);
        if !problems.is_empty() {
            return Err(JobError::Invalid(
                problems.into_iter().map(|problem| FieldError { field: "classes".into(), problem }).collect(),
            ));
        }
        // Every class without a label is named at once, not the first alone.
        let mut unlabelled = Vec::new();
        let mut refs = Vec::with_capacity(names.len());
        for (index, wnid) in names.into_iter().enumerate() {
            let label = match self.labels {
                LabelScheme::Position => Some(index),
                LabelScheme::Folder => folders.as_ref().and_then(|all| all.iter().position(|f| *f == wnid)),
                LabelScheme::Imagenet1k => classes::imagenet1k_label(&wnid).ok(),
            };
            match label {
                Some(label) => {
                    refs.push(ClassRef { wnid, label: label as i64, class_index: index as u64, listing: None })
                }
                None => unlabelled.push(format!("`{}`", wnid.escape_debug())),
            }
        }
        if unlabelled.is_empty() {
            return Ok(refs);
        }
        let (count, shown) = (unlabelled.len(), unlabelled.iter().take(10).cloned().collect::<Vec<_>>().join(", "));
        let more = if count > 10 { format!(" and {} more", count - 10) } else { String::new() };
        Err(invalid(match self.labels {
            LabelScheme::Folder => format!(
                "{shown}{more}: not a class folder of the dataset, so `labels = \"folder\"` gives {} no label",
                if count == 1 { "it" } else { "them" }
            ),
            _ => format!(
                "{shown}{more}: {} (wnid); for datasets that are not ImageNet set `labels = \"folder\"` (the class's \
                 index among the dataset's folders, as torchvision's ImageFolder numbers them) or `labels = \
                 \"position\"` (its position in this list)",
                if count == 1 { "not an ImageNet-1K synset" } else { "not ImageNet-1K synsets" }
            ),
        }))
    }

    /// The fingerprint of everything that determines the output images.
    pub fn fingerprint(&self, classes: &[ClassRef]) -> String {
        self.fingerprint_with_data(classes, None)
    }

    /// [`JobSpec::fingerprint`] that also covers the input data: `data` is a digest of every
    /// class's listing (names and sizes), so that replacing images at the same paths makes
    /// another job.
    pub fn fingerprint_with_data(&self, classes: &[ClassRef], data: Option<&str>) -> String {
        #[derive(Serialize)]
        struct Identity<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            data: Option<&'a str>,
            dataset: &'a str,
            classes: Vec<ClassIdentity<'a>>,
            ipc: usize,
            seed: u64,
            sampling: &'a SamplingSpec,
            dit: &'a Option<String>,
            vae_encoder: &'a Option<String>,
            vae_decoder: &'a Option<String>,
        }
        // What a class was always fingerprinted by; its recorded listing is covered by `data`.
        #[derive(Serialize)]
        struct ClassIdentity<'a> {
            wnid: &'a str,
            label: i64,
            class_index: u64,
        }
        let identity = Identity {
            data,
            dataset: &self.dataset,
            classes: classes
                .iter()
                .map(|c| ClassIdentity { wnid: &c.wnid, label: c.label, class_index: c.class_index })
                .collect(),
            ipc: self.ipc,
            seed: self.seed,
            sampling: &self.sampling,
            dit: &self.models.dit_fingerprint,
            vae_encoder: &self.models.vae_encoder_fingerprint,
            vae_decoder: &self.models.vae_decoder_fingerprint,
        };
        crate::sha256_hex(&serde_json::to_vec(&identity).expect("serialisable"))
    }

    /// Classes per shard for workers of the default policy: `classes_per_shard` as written,
    /// else the default for `ipc` at [`DEFAULT_MAX_BATCH`] rows.
    pub fn shard_size(&self) -> usize {
        self.shard_size_for(usize::MAX, crate::batch::PlannedRows::Default)
    }

    /// Classes per shard of a job of `classes` classes: `classes_per_shard` as written, else
    /// the default for `ipc` at the planned DiT rows — but never so many that the reported
    /// workers would outnumber the shards: at most ⌈classes / workers⌉, so every worker gets a
    /// shard (8 GPUs at 512 rows on ImageNette's 10 classes: shards of 2, not one of 10).
    pub fn shard_size_for(&self, classes: usize, planned: crate::batch::PlannedRows) -> usize {
        let fill = || {
            let size = default_classes_per_shard(self.ipc, planned.dit_rows());
            match planned {
                crate::batch::PlannedRows::Reported { workers, .. } if workers > 0 => {
                    size.min(classes.div_ceil(workers))
                }
                _ => size,
            }
        };
        self.classes_per_shard.unwrap_or_else(fill).max(1)
    }

    /// Contiguous shards of [`JobSpec::shard_size`] classes.
    pub fn plan_shards(&self, classes: usize) -> Vec<(usize, usize)> {
        self.plan_shards_for(classes, crate::batch::PlannedRows::Default)
    }

    /// Contiguous shards of [`JobSpec::shard_size_for`] `planned` classes. When the workers
    /// reported and `classes_per_shard` is not set, the last shards taper: each holds at most
    /// ⌈classes left ÷ (2 × workers)⌉ classes (guided self-scheduling, Polychronopoulos & Kuck
    /// 1987, at half its chunk), down to one, so that the workers' last shards end close
    /// together instead of a few full-size shards running on while the other GPUs idle, and a
    /// straggling shard near the end has few classes left for its backup to redo. Half the
    /// guided chunk, because a straggler's multi-class shard was what set the simulated
    /// ImageNet-21K × 1,024 GPUs makespan at the full chunk (194 s → 189 s, partial DiT calls of
    /// the smaller shards counted; README "Scale"); a quarter gained nothing more. A tapered
    /// size is then rounded down, to no less than half, to the count whose samples fill their
    /// DiT calls best ([`packed_classes_down`]): with the default size packed the same way
    /// ([`default_classes_per_shard`]), the simulated ImageNet-21K × 1,024 GPUs spent 1,572
    /// instead of 2,885 GPU-s on partial calls, makespan ÷ ideal 1.096 instead of 1.107 with 5 %
    /// preempted every 30 min (means of seeds 1–6; without preemption 1.071 and 1.072; README
    /// "Scale").
    pub fn plan_shards_for(&self, classes: usize, planned: crate::batch::PlannedRows) -> Vec<(usize, usize)> {
        let size = self.shard_size_for(classes, planned);
        let workers = match planned {
            crate::batch::PlannedRows::Reported { workers, .. } if workers > 0 && self.classes_per_shard.is_none() => {
                workers
            }
            _ => return (0..classes).step_by(size).map(|from| (from, (from + size).min(classes))).collect(),
        };
        // One worker has nobody to end together with: no taper.
        let chunks = if workers == 1 { 1 } else { 2 * workers };
        let mut shards = Vec::new();
        let mut from = 0;
        while from < classes {
            let take = (classes - from).div_ceil(chunks).clamp(1, size);
            // Down to half as many, the count that fills its DiT calls best (the largest of
            // the best): at IPC 50 and 256 rows a tapered shard of 3 classes (150 samples: calls
            // of 128 and 22) becomes one of 2 (100 samples: one call).
            let take = if take < size { packed_classes_down(self.ipc, planned.dit_rows(), take) } else { take };
            shards.push((from, from + take));
            from += take;
        }
        shards
    }
}

/// What is wrong with a list of class folder names, one message per problem (empty when none):
/// a name must be one folder (not empty, not `.` or `..`, no `/`, `\\` or control characters)
/// and appear once. Names are shown with hidden characters escaped.
pub fn class_name_problems(names: &[String]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for name in names {
        let shown = name.escape_debug();
        let why = if name.is_empty() {
            Some("it is empty".to_owned())
        } else if name == "." || name == ".." {
            Some("it names a folder itself, not a folder in it".to_owned())
        } else if name.contains(['/', '\\']) {
            Some("it holds a `/` or `\\`, so it names a path, not one folder".to_owned())
        } else if name.chars().any(char::is_control) {
            Some("it holds a control character (a line break, a tab)".to_owned())
        } else if name.len() > MAX_CLASS_NAME_BYTES {
            Some(format!(
                "it is {} bytes long: the files named after a class (`<class>-<16 hex>.npy` in the latent cache, \
                 `<class>.json#<n>` while a marker is written) must fit the 255 bytes a file name may have, so \
                 at most {MAX_CLASS_NAME_BYTES} bytes; rename the folder",
                name.len()
            ))
        } else {
            None
        };
        if let Some(why) = why {
            problems.push(format!("`{shown}` is not a class folder name (one folder of the dataset root): {why}"));
        } else if !seen.insert(name) {
            problems.push(format!("`{shown}` is listed twice"));
        }
    }
    problems
}

/// The longest class name, in bytes: the longest file name the job derives from it (the latent
/// cache's `<class>-<16 hex>.npy`, 21 bytes more, and a local store's `#<n>` while writing)
/// stays within the 255-byte file names of ext4, XFS and most others.
pub const MAX_CLASS_NAME_BYTES: usize = 200;

/// `path` with the links of its deepest existing ancestor resolved (the rest as written): where
/// it is, or will be once created.
fn real_path(path: &Path) -> std::path::PathBuf {
    let mut probe = path.to_path_buf();
    loop {
        if let Ok(real) = probe.canonicalize() {
            return real.join(path.strip_prefix(&probe).unwrap_or(Path::new("")));
        }
        if !probe.pop() {
            return path.to_path_buf();
        }
    }
}

/// A location as a path whose `starts_with` says containment: a local path (or `file://` URL)
/// made real ([`real_path`]), another URL as `scheme/host/path` with empty segments dropped;
/// `None` for a relative path or an unreadable URL.
fn comparable_location(location: &str) -> Option<std::path::PathBuf> {
    if location.starts_with("file://") || !crate::store::is_url(location) {
        let local = match location.strip_prefix("file://") {
            Some(_) => url::Url::parse(location).ok()?.to_file_path().ok()?,
            None => std::path::PathBuf::from(location),
        };
        return local.is_absolute().then(|| real_path(&local));
    }
    let url = url::Url::parse(location).ok()?;
    let mut at = std::path::PathBuf::from(url.scheme());
    at.push(url.host_str().unwrap_or(""));
    at.extend(url.path().split('/').filter(|part| !part.is_empty()));
    Some(at)
}

/// Checks a job id given by the user (`--job-id`): 1 to 128 letters, digits, `-`, `_` and `.`,
/// not starting with `.`, so that it names exactly one folder under `jobs/`.
///
/// # Errors
/// [`JobError::Invalid`] (field `job_id`) for any other id.
pub fn validate_job_id(id: &str) -> Result<(), JobError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        return Ok(());
    }
    Err(JobError::Invalid(vec![FieldError {
        field: "job_id".into(),
        problem: format!(
            "`{}` may only use letters, digits, '-', '_' and '.' (at most 128, not starting with '.')",
            id.escape_debug()
        ),
    }]))
}

/// The id of a job: its name (or "job") and the first 12 hex digits of its fingerprint.
pub fn job_id(spec: &JobSpec, fingerprint: &str) -> String {
    let hex = fingerprint.trim_start_matches("sha256:");
    format!("{}-{}", spec.name.as_deref().unwrap_or("job"), &hex[..12.min(hex.len())])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fingerprints, and so job ids, are those every earlier version gave: the values below were
    /// computed by mgd3 at 973530b (before class listings were recorded and before the sampler
    /// became one type), for a DDIM job with η, λ and t_stop set.
    #[test]
    fn a_list_where_one_value_goes_points_to_sweeps() {
        let text = "dataset = \"/d\"\nclasses = \"all\"\nipc = 10\n[sampling]\nguidance_scale = [0.1, 0.2]\n[models]\ndit = \"a\"\nvae_encoder = \"b\"\nvae_decoder = \"c\"\n";
        let error = JobSpec::from_toml(text).unwrap_err().to_string();
        assert!(error.contains("line 5") && error.contains("[sweep]"), "{error}");
    }

    /// A misspelt or mistyped setting does not hide the others' problems: every one is said in
    /// one pass (a misspelt `classes` hid `ipc = 0`, and `ipc = -1` added "missing field ipc").
    #[test]
    fn a_misspelt_or_mistyped_setting_hides_no_other_problem() {
        let spec = |top: &str| {
            format!(
                "name = \"x\"\ndataset = \"/d\"\n{top}\n[sampling]\nguidance_scale = -1.0\n[models]\ndit = \"a\"\nvae_encoder = \"b\"\nvae_decoder = \"c\"\n"
            )
        };
        let error = |top: &str| JobSpec::from_toml(&spec(top)).unwrap_err().to_string();
        let typo = error("clases = \"all\"\nipc = 0");
        for said in ["did you mean `classes`?", "`ipc`: must be at least 1", "`sampling.guidance_scale`: -1"] {
            assert!(typo.contains(said), "`{said}` missing: {typo}");
        }
        assert!(!typo.contains("missing field"), "{typo}");
        let mistyped = error("classes = \"all\"\nipc = -1");
        assert!(mistyped.contains("line 4 (`ipc = -1`)") && mistyped.contains("guidance_scale"), "{mistyped}");
        assert!(!mistyped.contains("missing field"), "{mistyped}");
        let beside = error("classes = \"all\"\nipc = 0\nipx = 3");
        for said in ["did you mean `ipc`?", "`ipc`: must be at least 1", "guidance_scale"] {
            assert!(beside.contains(said), "`{said}` missing: {beside}");
        }
        let upper = error("classes = \"all\"\nIPC = 2");
        assert!(upper.contains("did you mean `ipc`?") && !upper.contains("missing field"), "{upper}");
        // A required setting that is simply absent is still said.
        let absent = error("classes = \"all\"");
        assert!(absent.contains("missing field `ipc`"), "{absent}");
    }

    /// A setting shortened by a word names the settings that hold all its words, not the
    /// nearest spelling (`vae_fingerprint` was told `did you mean dit_fingerprint`).
    #[test]
    fn a_shortened_setting_names_the_settings_it_may_mean() {
        let text = "dataset = \"d\"\nclasses = \"all\"\nipc = 1\n[models]\ndit = \"a\"\nvae_encoder = \"b\"\nvae_decoder = \"c\"\nvae_fingerprint = \"x\"\n";
        let error = JobSpec::from_toml(text).unwrap_err().to_string();
        assert!(error.contains("did you mean `vae_encoder_fingerprint` or `vae_decoder_fingerprint`?"), "{error}");
        let plural = JobSpec::from_toml(&text.replace("vae_fingerprint", "vae_fingerprints")).unwrap_err().to_string();
        assert!(plural.contains("did you mean `vae_encoder_fingerprint` or `vae_decoder_fingerprint`?"), "{plural}");
        let typo = JobSpec::from_toml(&text.replace("vae_fingerprint", "dit_fingerprnt")).unwrap_err().to_string();
        assert!(typo.contains("did you mean `dit_fingerprint`?"), "{typo}");
    }

    /// A model fingerprint copied in capitals is the same digest: written in small letters when
    /// the spec is resolved, and valid.
    #[test]
    fn a_fingerprint_in_capitals_is_the_same_digest() {
        let upper = format!("sha256:{}", "0E09F9FF".repeat(8));
        let text = format!(
            "dataset = \"d\"\nclasses = \"all\"\nipc = 1\n[models]\ndit = \"a\"\nvae_encoder = \"b\"\nvae_decoder = \"c\"\ndit_fingerprint = \" {upper}\"\n"
        );
        let mut spec = JobSpec::from_toml(&text).unwrap();
        spec.resolve_paths(Path::new("/specs"));
        assert_eq!(spec.models.dit_fingerprint, Some(upper.trim().to_ascii_lowercase()));
        spec.validate().unwrap();
    }

    /// An object-store URL with a slash or its colon missing is refused naming the URL meant,
    /// before and after the spec's paths are resolved (`output = "s3:/bucket/out"` wrote to a
    /// local folder `s3:` beside the spec, and `check` passed it).
    #[test]
    fn a_url_with_a_slash_missing_is_refused_naming_the_url_meant() {
        let text = "dataset = \"gs//data/train\"\nclasses = \"all\"\nipc = 10\noutput = \"s3:/bucket/out\"\n[models]\ndit = \"a\"\nvae_encoder = \"b\"\nvae_decoder = \"c\"\n";
        let mut spec = JobSpec::from_toml(text).unwrap();
        spec.resolve_paths(Path::new("/specs"));
        assert_eq!(spec.output.as_deref(), Some("s3:/bucket/out"), "left as written for its check");
        let error = spec.validate().unwrap_err().to_string();
        for said in ["output", "write `s3://bucket/out`", "dataset", "write `gs://data/train`"] {
            assert!(error.contains(said), "`{said}` missing: {error}");
        }
        let mut empty = JobSpec::from_toml(&text.replace("gs//data/train", "")).unwrap();
        empty.resolve_paths(Path::new("/specs"));
        let error = empty.validate().unwrap_err().to_string();
        assert!(error.contains("`dataset`: is empty"), "{error}");
        assert_eq!(crate::store::url_typo("s3:bucket/out").as_deref(), Some("s3://bucket/out"));
        assert_eq!(crate::store::url_typo("s3://bucket"), None);
        assert_eq!(crate::store::url_typo("out/s3:/x"), None, "a folder inside another");
        assert_eq!(crate::store::url_typo("s3data/out"), None);
        assert!(crate::store::open("memory:/m/x").is_err());
        let problem = |text: &str| crate::store::location_problem(text).unwrap_or_default();
        assert!(problem("s4://b/out").contains("unsupported scheme `s4`"));
        assert!(problem("s3:///out").contains("names no bucket"));
        for fine in ["s3://b/out", "S3://b", "file:///tmp/x", "memory://m", "/data/x", "rel/x"] {
            assert_eq!(crate::store::location_problem(fine), None, "{fine}");
        }
    }

    /// A CFG scale outside 0..=MAX_CFG_SCALE (10⁶ gave noise and a success) is refused at the
    /// spec, naming the setting; the reference's 4, 0, 1 and the bound itself pass.
    #[test]
    fn a_cfg_scale_out_of_range_is_refused() {
        let with = |cfg: &str| {
            let text = format!(
                "dataset = \"/d\"\nclasses = \"all\"\nipc = 10\n[sampling]\ncfg_scale = {cfg}\n[models]\ndit = \"a\"\nvae_encoder = \"b\"\nvae_decoder = \"c\"\n"
            );
            JobSpec::from_toml(&text).and_then(|spec| spec.validate()).map_err(|e| e.to_string())
        };
        for ok in ["0.0", "1.0", "4.0", "50.0"] {
            assert_eq!(with(ok), Ok(()), "cfg_scale = {ok}");
        }
        for bad in ["1e6", "-3.0", "50.5", "inf", "nan"] {
            let error = with(bad).expect_err(bad);
            assert!(error.contains("sampling.cfg_scale") && error.contains("outside 0..=50"), "{bad}: {error}");
        }
    }

    /// Every name that cannot be one class folder is refused with why: empty, `.`/`..`, a path,
    /// a control character, or too long for the file names derived from it (a 249-byte name
    /// passed check, then stalled every commit on "File name too long"); repeats are named.
    #[test]
    fn class_names_that_cannot_be_one_folder_are_refused_with_why() {
        let long = "x".repeat(MAX_CLASS_NAME_BYTES + 1);
        let longest = "é".repeat(MAX_CLASS_NAME_BYTES / 2);
        let names: Vec<String> =
            ["", "..", "a/b", "new\nline", long.as_str(), longest.as_str(), "n01", "n01"].map(String::from).into();
        let problems = class_name_problems(&names);
        for (i, why) in [
            "it is empty",
            "it names a folder itself",
            "it holds a `/` or `\\`",
            "it holds a control character",
            &format!("it is {} bytes long", MAX_CLASS_NAME_BYTES + 1),
        ]
        .iter()
        .enumerate()
        {
            assert!(
                problems[i].contains("is not a class folder name") && problems[i].contains(why),
                "{i}: {problems:?}"
            );
        }
        assert!(problems[3].contains("`new\\nline`"), "{problems:?}");
        assert_eq!(problems[5], "`n01` is listed twice");
        assert_eq!(problems.len(), 6, "{problems:?}");
    }

    /// `output` or `latent_cache` at or under the dataset root is refused, however it is
    /// written (a link to the dataset, `file://`, a trailing slash, an object-store prefix); a
    /// sibling whose name only starts like the dataset's, or the dataset inside the output, is
    /// not.
    #[test]
    fn an_output_inside_the_dataset_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("data/train/a")).unwrap();
        std::os::unix::fs::symlink(root.join("data/train"), root.join("link")).unwrap();
        let spec = |dataset: &str, output: &str, cache: Option<&str>| {
            let mut text = format!("dataset = \"{dataset}\"\nclasses = \"all\"\nipc = 1\noutput = \"{output}\"\n");
            if let Some(cache) = cache {
                // Raw TOML: `true`, or a quoted location.
                text.push_str(&format!("latent_cache = {cache}\n"));
            }
            text.push_str("[models]\ndit = \"a\"\nvae_encoder = \"b\"\nvae_decoder = \"c\"\n");
            JobSpec::from_toml(&text).unwrap()
        };
        let fields = |spec: JobSpec| spec.inside_dataset_problems().into_iter().map(|p| p.field).collect::<Vec<_>>();
        let train = root.join("data/train").display().to_string();
        let inside = [
            train.clone(),
            format!("{train}/"),
            format!("{train}/a/out"),
            format!("file://{train}/not/yet/made"),
            root.join("link/out").display().to_string(),
        ];
        for output in inside {
            assert_eq!(fields(spec(&train, &output, None)), vec!["output"], "{output}");
        }
        let error = spec(&train, &train, None).inside_dataset_problems().remove(0).problem;
        assert!(error.contains("is inside the dataset") && error.contains("put it outside the dataset"), "{error}");
        // The link as the dataset, the real folder as the output.
        assert_eq!(fields(spec(&root.join("link").display().to_string(), &train, None)), vec!["output"]);
        // The default cache under an output inside, and a cache set inside.
        let out = root.join("out").display().to_string();
        assert_eq!(fields(spec(&train, &format!("{train}/x"), Some("true"))), vec!["output", "latent_cache"]);
        assert_eq!(fields(spec(&train, &out, Some(&format!("\"{train}/cache\"")))), vec!["latent_cache"]);
        for (dataset, output) in [
            (train.clone(), root.join("data/train2").display().to_string()),
            (train.clone(), root.join("data").display().to_string()),
            (train.clone(), out.clone()),
            ("s3://bucket/imagenet/train".to_owned(), "s3://bucket/imagenet/train2".to_owned()),
            ("s3://bucket/imagenet/train".to_owned(), "s3://other/imagenet/train".to_owned()),
            ("s3://bucket/imagenet/train".to_owned(), train.clone()),
        ] {
            assert_eq!(fields(spec(&dataset, &output, Some("true"))), Vec::<String>::new(), "{dataset} {output}");
        }
        for output in ["s3://bucket/imagenet/train/", "s3://bucket/imagenet//train/out"] {
            assert_eq!(fields(spec("s3://bucket/imagenet/train", output, None)), vec!["output"], "{output}");
        }
    }

    #[test]
    fn fingerprints_are_unchanged_from_earlier_versions() {
        let spec = JobSpec::from_toml(
            r#"name = "pin"
dataset = "/data/imagenet/train"
classes = ["n01440764", "n01443537"]
ipc = 10
seed = 7
[sampling]
sampler = "ddim"
eta = 0.5
guidance_scale = 0.1
stop_guidance = 25
[models]
dit = "/m/dit.onnx"
vae_encoder = "/m/enc.onnx"
vae_decoder = "/m/dec.onnx"
dit_fingerprint = "sha256:aa"
vae_encoder_fingerprint = "sha256:bb"
vae_decoder_fingerprint = "sha256:cc""#,
        )
        .unwrap();
        let classes = vec![
            ClassRef { wnid: "n01440764".into(), label: 0, class_index: 0, listing: None },
            ClassRef { wnid: "n01443537".into(), label: 1, class_index: 1, listing: None },
        ];
        assert_eq!(
            spec.fingerprint_with_data(&classes, Some("sha256:0123")),
            "sha256:9862f8c20b0920fa4f4e9eeeba17147f157950cc978e5d43193417f942cc854a"
        );
        assert_eq!(
            spec.fingerprint(&classes),
            "sha256:eed7c48f36b39096adf84e2de6a5550702b249b3ae165b0e346612d5e80c2791"
        );
        // The listing a class carries for the workers is no part of it.
        let mut listed = classes.clone();
        listed[0].listing = Some(crate::imagefolder::ListingSummary {
            digest: "sha256:1".into(),
            names_digest: "sha256:2".into(),
            images: 1300,
            bytes: 1,
            content_digest: Some("sha256:3".into()),
        });
        assert_eq!(
            spec.fingerprint(&listed),
            "sha256:eed7c48f36b39096adf84e2de6a5550702b249b3ae165b0e346612d5e80c2791"
        );
    }

    #[test]
    fn labels_are_checked_against_the_dits_classes_in_one_place() {
        assert!(check_label("n01", 0, 1000).is_ok() && check_label("n01", 999, 1000).is_ok());
        for label in [-1, 1000, 1001] {
            let error = check_label("n01", label, 1000).unwrap_err();
            assert_eq!(
                error.to_string(),
                format!("class `n01`: label {label} is outside the DiT's 1000 classes (labels 0 to 999)")
            );
        }
    }

    const SPEC: &str = r#"
name = "nette"
dataset = "data/train"
classes = "imagenette"
ipc = 10
[models]
dit = "m/dit.onnx"
vae_encoder = "m/enc.onnx"
vae_decoder = "m/dec.onnx"
"#;

    #[test]
    fn parses_with_reference_defaults() {
        let spec = JobSpec::from_toml(SPEC).unwrap();
        spec.validate().unwrap();
        assert_eq!(spec.sampling, SamplingSpec::default());
        assert_eq!(
            (spec.sampling.guidance_scale, spec.sampling.stop_guidance, spec.sampling.cfg_scale),
            (0.1, 25, 4.0)
        );
        let classes = spec.class_list(|| unreachable!()).unwrap();
        assert_eq!(classes.len(), 10);
        assert_eq!(classes[1], ClassRef { wnid: "n02102040".into(), label: 217, class_index: 1, listing: None });
    }

    #[test]
    fn unknown_fields_and_bad_types_name_the_field() {
        let err = JobSpec::from_toml(&SPEC.replace("ipc = 10", "ipc = 10\nipcs = 3")).unwrap_err().to_string();
        assert!(err.contains("ipcs"), "{err}");
        let err = JobSpec::from_toml(&SPEC.replace("ipc = 10", "ipc = \"ten\"")).unwrap_err().to_string();
        assert!(err.contains("ipc"), "{err}");
        let err =
            JobSpec::from_toml(&SPEC.replace("[models]", "[sampling]\nlambda = 1\n[models]")).unwrap_err().to_string();
        assert!(err.contains("lambda"), "{err}");
    }

    /// Every field-level problem of the TOML at once, each with its line (numbers as in the file),
    /// and a misspelled field with the name it probably meant.
    #[test]
    fn every_toml_level_problem_is_listed_at_once_with_did_you_mean() {
        let text = SPEC
            .replace("ipc = 10", "ipcc = 10\nseed = \"five\"")
            .replace("[models]", "[sampling]\nguidance_scal = 0.1\nbogus_setting = 1\n[models]");
        let line = |prefix: &str| text.lines().position(|l| l.starts_with(prefix)).unwrap() + 1;
        let err = JobSpec::from_toml(&text).unwrap_err();
        assert!(matches!(err, JobError::Shape(_)), "{err:?}");
        let err = err.to_string();
        for part in [
            format!("line {} (`ipcc = 10`): unknown field `ipcc`", line("ipcc")),
            "did you mean `ipc`?".to_owned(),
            format!(
                "line {} (`seed = \"five\"`): invalid type: string \"five\", expected a whole number",
                line("seed")
            ),
            format!("line {} (`guidance_scal = 0.1`)", line("guidance_scal")),
            "did you mean `guidance_scale`?".to_owned(),
            format!("line {} (`bogus_setting = 1`)", line("bogus_setting")),
        ] {
            assert!(err.contains(&part), "{err}\nlacks {part}");
        }
        assert!(!err.contains("`bogus_setting`; did you mean"), "no far-fetched suggestion: {err}");
        assert_eq!(edit_distance("guidance_scal", "guidance_scale"), 1);
        assert_eq!(edit_distance("", "ab"), 2);
    }

    #[test]
    fn valid_toml_with_a_wrong_field_is_not_called_invalid_toml() {
        let text = SPEC.replace("ipc = 10", "ipc = 10\nipcs = 3");
        let line = text.lines().position(|l| l.starts_with("ipcs")).unwrap() + 1;
        let err = JobSpec::from_toml(&text).unwrap_err();
        assert!(matches!(err, JobError::Shape(_)), "{err:?}");
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("invalid job spec: line {line} (`ipcs = 3`): unknown field `ipcs`")),
            "{text}"
        );
        assert!(!text.contains("TOML"), "{text}");
        let err = JobSpec::from_toml("ipc = = 3").unwrap_err();
        assert!(matches!(err, JobError::Toml(_)), "{err:?}");
        assert!(err.to_string().starts_with("job spec is not valid TOML: line 1 (`ipc = = 3`): "), "{err}");
    }

    #[test]
    fn every_invalid_field_is_reported() {
        let text = SPEC.replace("ipc = 10", "ipc = 0\nclasses_per_shard = 0\nmax_attempts = 0").replace(
            "[models]",
            "[sampling]\nsteps = 10\nstop_guidance = 11\ncfg_channels = 0\n[models]\ndit_fingerprint = \"abc\"",
        );
        let err = JobSpec::from_toml(&text).unwrap().validate().unwrap_err().to_string();
        for field in [
            "`ipc`",
            "`classes_per_shard`",
            "`max_attempts`",
            "`sampling.stop_guidance`",
            "`sampling.cfg_channels`",
            "`models.dit_fingerprint`",
        ] {
            assert!(err.contains(field), "{field} missing from {err}");
        }
    }

    /// `sampler = "ddim"` with η parses and enters the fingerprint; a DDPM spec serialises as
    /// before (old jobs keep their ids); η outside 0..=1 or with DDPM is refused by name.
    #[test]
    fn the_sampler_and_eta_are_settings_of_the_job() {
        let ddpm = JobSpec::from_toml(SPEC).unwrap();
        assert_eq!((ddpm.sampling.sampler, ddpm.sampling.eta), (SamplerKind::Ddpm, 0.0));
        let json = serde_json::to_string(&ddpm.sampling).unwrap();
        assert!(!json.contains("sampler") && !json.contains("eta"), "{json}");
        let classes = ddpm.class_list(|| unreachable!()).unwrap();
        let with =
            |extra: &str| JobSpec::from_toml(&SPEC.replace("[models]", &format!("[sampling]\n{extra}\n[models]")));
        let explicit = with("sampler = \"ddpm\"").unwrap();
        assert_eq!(explicit.fingerprint(&classes), ddpm.fingerprint(&classes));
        let ddim = with("sampler = \"ddim\"\neta = 0.5").unwrap();
        assert_eq!((ddim.sampling.sampler, ddim.sampling.eta), (SamplerKind::Ddim, 0.5));
        assert!(ddim.validate().is_ok());
        assert_ne!(ddim.fingerprint(&classes), ddpm.fingerprint(&classes));
        assert_ne!(with("sampler = \"ddim\"").unwrap().fingerprint(&classes), ddim.fingerprint(&classes));
        for bad in ["sampler = \"ddpm\"\neta = 0.5", "sampler = \"ddim\"\neta = 1.5", "sampler = \"ddim\"\neta = -0.1"]
        {
            let err = with(bad).unwrap().validate().unwrap_err().to_string();
            assert!(err.contains("`sampling.eta`"), "{bad}: {err}");
        }
        let err = with("sampler = \"euler\"").unwrap_err().to_string();
        assert!(err.contains("euler") && err.contains("ddim"), "{err}");
        assert_eq!("ddim".parse::<SamplerKind>(), Ok(SamplerKind::Ddim));
        assert_eq!((ddim_stride(1000, 50), ddim_stride(1000, 250), ddim_stride(1000, 400)), (Some(20), Some(4), None));
        assert_eq!(SamplerKind::Ddim.to_string(), "ddim");
    }

    #[test]
    fn labels_and_class_sources() {
        let mut spec = JobSpec::from_toml(SPEC).unwrap();
        spec.classes = ClassSelection::List(vec!["shoe".into(), "n01440764".into(), "bag".into()]);
        let err = spec.class_list(|| unreachable!()).unwrap_err().to_string();
        // Every class without a label, at once.
        assert!(
            err.contains("`shoe`, `bag`: not ImageNet-1K synsets") && err.contains("labels = \"position\""),
            "{err}"
        );
        spec.classes = ClassSelection::List(vec!["shoe".into(), "bag".into()]);
        spec.labels = LabelScheme::Position;
        let classes = spec.class_list(|| unreachable!()).unwrap();
        assert_eq!((classes[1].wnid.as_str(), classes[1].label), ("bag", 1));
        spec.classes = ClassSelection::Named("all".into());
        let classes = spec.class_list(|| Ok(vec!["a".into(), "b".into(), "c".into()])).unwrap();
        assert_eq!(classes.len(), 3);
        // "folder": a subset keeps the labels of the whole ImageFolder.
        spec.labels = LabelScheme::Folder;
        spec.classes = ClassSelection::List(vec!["05_sandal".into(), "01_trouser".into()]);
        let folders = || {
            Ok((0..10)
                .map(|i| {
                    format!(
                        "{i:02}_{}",
                        [
                            "tshirt_top",
                            "trouser",
                            "pullover",
                            "dress",
                            "coat",
                            "sandal",
                            "shirt",
                            "sneaker",
                            "bag",
                            "ankle_boot"
                        ][i]
                    )
                })
                .collect())
        };
        let classes = spec.class_list(folders).unwrap();
        assert_eq!(classes.iter().map(|c| c.label).collect::<Vec<_>>(), [5, 1]);
        spec.classes = ClassSelection::List(vec!["99_missing".into()]);
        let err = spec.class_list(folders).unwrap_err().to_string();
        assert!(err.contains("99_missing") && err.contains("labels = \"folder\""), "{err}");
        assert_eq!(
            JobSpec::from_toml(&SPEC.replace("ipc = 10", "ipc = 10\nlabels = \"folder\"")).unwrap().labels,
            LabelScheme::Folder
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("wnids.txt"), "n01440764\n\n# comment\nn02102040\n").unwrap();
        let mut spec =
            JobSpec::from_toml(&SPEC.replace("classes = \"imagenette\"", "classes = { file = \"wnids.txt\" }"))
                .unwrap();
        spec.resolve_paths(dir.path());
        let classes = spec.class_list(|| unreachable!()).unwrap();
        assert_eq!(classes.iter().map(|c| c.label).collect::<Vec<_>>(), [0, 217]);
    }

    /// Inline lists, list files and folder listings go through one validation: the same names
    /// are refused (or accepted) whatever their source, a BOM and CRLFs in a list file are not
    /// part of any name, and messages show hidden characters escaped.
    #[test]
    fn every_class_source_is_validated_the_same_way() {
        let dir = tempfile::tempdir().unwrap();
        let from_file = |text: &str| {
            std::fs::write(dir.path().join("list.txt"), text).unwrap();
            let mut spec =
                JobSpec::from_toml(&SPEC.replace("classes = \"imagenette\"", "classes = { file = \"list.txt\" }"))
                    .unwrap();
            spec.resolve_paths(dir.path());
            spec.class_list(|| unreachable!())
        };
        let inline = |names: &[&str]| {
            let mut spec = JobSpec::from_toml(SPEC).unwrap();
            spec.labels = LabelScheme::Position;
            spec.classes = ClassSelection::List(names.iter().map(|s| s.to_string()).collect());
            (spec.validate(), spec.class_list(|| unreachable!()))
        };
        let listed = |names: &[&str]| {
            let mut spec = JobSpec::from_toml(SPEC).unwrap();
            spec.labels = LabelScheme::Position;
            spec.classes = ClassSelection::Named("all".into());
            spec.class_list(|| Ok(names.iter().map(|s| s.to_string()).collect()))
        };
        // BOM and CRLF: read as the plain names.
        let classes = from_file("\u{feff}n01440764\r\nn02102040\r\n").unwrap();
        assert_eq!(
            classes.iter().map(|c| (c.wnid.as_str(), c.label)).collect::<Vec<_>>(),
            [("n01440764", 0), ("n02102040", 217)]
        );
        for bad in [&["a", "../etc"][..], &["a", ".."], &["."], &["a", "a"], &["a\u{7}b"], &["x\\y"]] {
            let file_error = from_file(&bad.join("\n")).map(|_| ()).unwrap_err().to_string();
            let (validated, resolved) = inline(bad);
            let inline_error = resolved.map(|_| ()).unwrap_err().to_string();
            assert!(validated.is_err(), "{bad:?} passes inline validation");
            let listed_error = listed(bad).map(|_| ()).unwrap_err().to_string();
            assert!(file_error.contains("`classes`"), "{file_error}");
            assert_eq!(file_error, inline_error, "{bad:?}");
            assert_eq!(listed_error, inline_error, "{bad:?}");
        }
        let error = inline(&["a\u{7}b"]).1.map(|_| ()).unwrap_err().to_string();
        assert!(error.contains("a\\u{7}b"), "hidden characters are shown escaped: {error}");
        assert!(from_file("n01440764\nn01440764\n").unwrap_err().to_string().contains("listed twice"));
    }

    #[test]
    fn job_ids_name_exactly_one_folder() {
        for good in ["nette-1a2b", "A.b_c-9"] {
            assert!(validate_job_id(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", "../x", "a/b", "job A/dataset", ".hidden", "a\\b", "é"] {
            assert!(validate_job_id(bad).unwrap_err().to_string().contains("`job_id`"), "{bad}");
        }
    }

    #[test]
    fn default_shards_fill_the_dit_calls_of_the_default_max_batch() {
        // At least one call's samples and 4 classes, then the size up to twice that whose
        // samples fill their calls best: IPC 10 at 64 rows (32 samples a call) takes 6 classes
        // (calls of 32 and 28), not 4 (32 and 8).
        assert_eq!(default_classes_per_shard(10, 64), 6);
        assert_eq!(call_fill(6, 10, 64), 60.0 / 64.0);
        assert_eq!(call_fill(4, 10, 64), 40.0 / 64.0);
        assert_eq!(default_classes_per_shard(1, 64), 32);
        assert_eq!(default_classes_per_shard(50, 64), 7); // 350 samples in 11 calls of 32
        assert_eq!(default_classes_per_shard(50, 256), 5); // 250 in calls of 128 and 122
        assert_eq!(default_classes_per_shard(100, 256), 5); // 500 in 4 calls, 12 rows spare
        assert_eq!(default_classes_per_shard(3, 256), 85); // 255 of 2 x 128
        assert_eq!(default_classes_per_shard(10, 512), 51);
        // Ties within 1 % go to the fewest classes (default) or the most (taper).
        assert_eq!(packed_classes(50, 256, 1, 10), 5);
        assert_eq!(packed_classes_down(50, 256, 3), 2); // 100 samples in one call, not 150 in two
        assert_eq!(packed_classes_down(50, 256, 4), 4); // 200 fills as well as 100: fewer shards
        assert_eq!(packed_classes_down(50, 256, 1), 1);
        let spec = JobSpec::from_toml(SPEC).unwrap();
        assert_eq!(spec.classes_per_shard, None);
        assert_eq!(spec.shard_size(), default_classes_per_shard(spec.ipc, DEFAULT_MAX_BATCH));
        assert_eq!(spec.plan_shards(10), [(0, 6), (6, 10)]);
        // Sized by what the workers report, never more than one worker's share: one worker at
        // 512 rows takes all 30 classes in one shard (not 51).
        let big = crate::batch::PlannedRows::Reported { dit_rows: 512, workers: 1 };
        assert_eq!(spec.shard_size_for(30, big), 30);
        assert_eq!(spec.plan_shards_for(30, big), [(0, 30)]);
        // ... but never fewer shards than workers, and the last two rounds taper to one class
        // each: 8 workers on 10 classes get ten shards of 1.
        let eight = crate::batch::PlannedRows::Reported { dit_rows: 512, workers: 8 };
        assert_eq!(spec.plan_shards_for(10, eight), (0..10).map(|i| (i, i + 1)).collect::<Vec<_>>());
        // 1,000 classes: shards of 51 fill the calls until fewer than 2 × 8 × 51 classes are
        // left, then each takes ⌈left ÷ 16⌉, or down to half that when fewer fill the calls
        // better (25 classes: 250 samples in one call of 256, not 470 in two), the last sixteen
        // one class each.
        let plan = spec.plan_shards_for(1000, eight);
        let sizes: Vec<usize> = plan.iter().map(|(from, to)| to - from).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 1000);
        assert!(plan.windows(2).all(|w| w[0].1 == w[1].0) && plan[0].0 == 0, "contiguous: {plan:?}");
        assert!(sizes.windows(2).all(|w| w[0] >= w[1]), "never growing: {sizes:?}");
        assert_eq!(sizes[..6], [51, 51, 51, 51, 50, 25], "{sizes:?}");
        assert_eq!(sizes[sizes.len() - 16..], [1; 16], "{sizes:?}");
        assert_eq!(sizes[sizes.len() - 17], 2, "{sizes:?}");
        // ImageNet-21K at IPC 50 on 1,024 GPUs reporting 256 rows: shards of 5 (two calls, 6
        // rows spare), the taper's 4 and 2 (one or two calls, none of 3), the last round of 1.
        let mut ipc50 = spec.clone();
        ipc50.ipc = 50;
        let gpus = crate::batch::PlannedRows::Reported { dit_rows: 256, workers: 1024 };
        let mut counts = std::collections::BTreeMap::new();
        for (from, to) in ipc50.plan_shards_for(21_841, gpus) {
            *counts.entry(to - from).or_insert(0) += 1;
        }
        assert_eq!(counts.into_iter().collect::<Vec<_>>(), [(1, 2047), (2, 2048), (4, 512), (5, 2730)]);
        // A size set by hand is kept to the last shard.
        let by_hand = JobSpec::from_toml(&format!("classes_per_shard = 3\n{SPEC}")).unwrap();
        assert_eq!(by_hand.plan_shards_for(7, eight), [(0, 3), (3, 6), (6, 7)]);
        let set = JobSpec::from_toml(&format!("classes_per_shard = 3\n{SPEC}")).unwrap();
        assert_eq!(set.plan_shards(7), [(0, 3), (3, 6), (6, 7)]);
    }

    #[test]
    fn fingerprint_ignores_operations_but_not_outputs() {
        let spec = JobSpec::from_toml(SPEC).unwrap();
        let classes = spec.class_list(|| unreachable!()).unwrap();
        let base = spec.fingerprint(&classes);
        let mut ops = spec.clone();
        ops.lease_timeout_s = 999;
        ops.classes_per_shard = Some(2);
        ops.max_attempts = 9;
        assert_eq!(ops.fingerprint(&classes), base);
        let mut other = spec.clone();
        other.seed = 1;
        assert_ne!(other.fingerprint(&classes), base);
        let mut other = spec.clone();
        other.sampling.stop_guidance = 50;
        assert_ne!(other.fingerprint(&classes), base);
        assert_eq!(spec.plan_shards(5), vec![(0, 5)]);
        assert_eq!(ops.plan_shards(5), vec![(0, 2), (2, 4), (4, 5)]);
        assert!(job_id(&spec, &base).starts_with("nette-"));
    }
}
