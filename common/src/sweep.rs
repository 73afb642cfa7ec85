//! Sweeps: a job spec with a `[sweep]` table is a set of jobs that differ in a few settings —
//! the paper's ablations over λ, t_stop, IPC or the sampler. The table's keys name settings
//! ([`SweepKey`]) with a list of values each, expanded as a grid (the last key, in alphabetical
//! order, varying fastest), or `variants = [{..}, ..]` lists each variant's settings. Every variant
//! is the job the same document would be without `[sweep]` and with its settings written in: its
//! own spec, fingerprint and id, so a variant's output is the output of that job submitted alone.
//! What the variants share (real-image latents, k-means modes) is found through the latent
//! cache, which a sweep turns on unless the spec sets `latent_cache`. The sweep's record
//! ([`SweepRecord`]) names the variants' jobs; its id is `<name>-sweep-<12 hex>` of the variants'
//! fingerprints ([`sweep_id`]).

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::job::{FieldError, JobError, JobSpec};

/// Variants a sweep may expand to unless `max_variants` says otherwise: the paper's largest
/// ablation (t_stop 0–50 by 5 × five λ, 55 jobs) fits; a typo of an extra list does not run
/// thousands of jobs.
pub const DEFAULT_MAX_VARIANTS: usize = 100;

/// The most `max_variants` may raise the cap to: each variant is a job of its own (records, a
/// spec checked and resolved, a row of the comparison), and a grid of millions was expanded in
/// full (10 GB, minutes) before being refused.
pub const HARD_MAX_VARIANTS: usize = 10_000;

/// [`SweepRecord`]'s layout version.
pub const SWEEP_SCHEMA_VERSION: u32 = 1;

/// A setting a sweep may vary: the sampling settings, IPC and the seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SweepKey {
    /// `ipc`: images per class (k of k-means).
    Ipc,
    /// `seed`: the job seed (k-means++ and noise).
    Seed,
    /// `guidance_scale`: λ.
    GuidanceScale,
    /// `stop_guidance`: t_stop.
    StopGuidance,
    /// `cfg_scale`: classifier-free guidance scale.
    CfgScale,
    /// `cfg_channels`: ε channels CFG mixes.
    CfgChannels,
    /// `steps`: sampling steps.
    Steps,
    /// `sampler`: `"ddpm"` or `"ddim"`.
    Sampler,
    /// `eta`: DDIM's η.
    Eta,
}

/// What a sweep key's values are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Whole,
    Number,
    Text,
}

impl SweepKey {
    /// Every key, in the order the spec's documentation lists them.
    pub const ALL: [SweepKey; 9] = [
        SweepKey::Ipc,
        SweepKey::Seed,
        SweepKey::GuidanceScale,
        SweepKey::StopGuidance,
        SweepKey::CfgScale,
        SweepKey::CfgChannels,
        SweepKey::Steps,
        SweepKey::Sampler,
        SweepKey::Eta,
    ];

    /// The key as written in `[sweep]` (`guidance_scale`).
    pub fn name(self) -> &'static str {
        match self {
            SweepKey::Ipc => "ipc",
            SweepKey::Seed => "seed",
            SweepKey::GuidanceScale => "guidance_scale",
            SweepKey::StopGuidance => "stop_guidance",
            SweepKey::CfgScale => "cfg_scale",
            SweepKey::CfgChannels => "cfg_channels",
            SweepKey::Steps => "steps",
            SweepKey::Sampler => "sampler",
            SweepKey::Eta => "eta",
        }
    }

    /// The key of the same setting in a job spec (`sampling.guidance_scale`).
    pub fn spec_key(self) -> String {
        match self {
            SweepKey::Ipc | SweepKey::Seed => self.name().to_owned(),
            _ => format!("sampling.{}", self.name()),
        }
    }

    /// The key named `name`.
    pub fn from_name(name: &str) -> Option<SweepKey> {
        SweepKey::ALL.into_iter().find(|k| k.name() == name)
    }

    fn kind(self) -> Kind {
        match self {
            SweepKey::Ipc | SweepKey::Seed | SweepKey::StopGuidance | SweepKey::CfgChannels | SweepKey::Steps => {
                Kind::Whole
            }
            SweepKey::GuidanceScale | SweepKey::CfgScale | SweepKey::Eta => Kind::Number,
            SweepKey::Sampler => Kind::Text,
        }
    }

    /// Why `value` cannot be this key's value, if it cannot (its type; ranges are the spec's).
    fn type_problem(self, value: &toml::Value) -> Option<String> {
        let fits = match (self.kind(), value) {
            (Kind::Whole, toml::Value::Integer(v)) => *v >= 0,
            (Kind::Number, toml::Value::Integer(_) | toml::Value::Float(_)) => true,
            (Kind::Text, toml::Value::String(name)) => name.parse::<crate::job::SamplerKind>().is_ok(),
            _ => false,
        };
        (!fits).then(|| {
            let expected = match self.kind() {
                Kind::Whole => "a whole number ≥ 0",
                Kind::Number => "a number",
                Kind::Text => "a name (\"ddpm\" or \"ddim\")",
            };
            format!("{value} is not {expected}")
        })
    }

    /// The key's value in `spec`, as a sweep's tables show it.
    pub fn value_in(self, spec: &JobSpec) -> String {
        let s = &spec.sampling;
        match self {
            SweepKey::Ipc => spec.ipc.to_string(),
            SweepKey::Seed => spec.seed.to_string(),
            SweepKey::GuidanceScale => s.guidance_scale.to_string(),
            SweepKey::StopGuidance => s.stop_guidance.to_string(),
            SweepKey::CfgScale => s.cfg_scale.to_string(),
            SweepKey::CfgChannels => s.cfg_channels.to_string(),
            SweepKey::Steps => s.steps.to_string(),
            SweepKey::Sampler => s.sampler.to_string(),
            SweepKey::Eta => s.eta.to_string(),
        }
    }

    /// Writes `value` into a spec document as this setting.
    fn apply(self, document: &mut toml::Table, value: toml::Value) {
        match self {
            SweepKey::Ipc | SweepKey::Seed => {
                document.insert(self.name().to_owned(), value);
            }
            _ => {
                let sampling = document.entry("sampling").or_insert_with(|| toml::Value::Table(toml::Table::new()));
                if let toml::Value::Table(table) = sampling {
                    table.insert(self.name().to_owned(), value);
                }
            }
        }
    }
}

impl std::fmt::Display for SweepKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One job of a sweep.
#[derive(Clone, Debug, PartialEq)]
pub struct Variant {
    /// The swept settings, in the sweep's key order, with the values as the spec now reads them.
    pub settings: Vec<(SweepKey, String)>,
    /// The variant's spec: the document without `[sweep]`, with these settings written in.
    pub spec: JobSpec,
    /// That document as TOML: the spec to submit to get this job alone.
    pub toml: String,
}

impl Variant {
    /// `guidance_scale=0.1 stop_guidance=25`: the variant as people read it.
    pub fn label(&self) -> String {
        self.settings.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
    }
}

/// A job spec with a `[sweep]` table, expanded.
#[derive(Clone, Debug)]
pub struct Sweep {
    /// The settings the variants differ in: the grid's keys in alphabetical order, or every key
    /// a `variants` entry names, in [`SweepKey::ALL`]'s order.
    pub keys: Vec<SweepKey>,
    /// The variants, in grid order (last key fastest) or as listed.
    pub variants: Vec<Variant>,
    /// The spec did not set `latent_cache`, so the sweep turned it on (under `<output>/cache`)
    /// for its variants to share encodings and modes.
    pub cache_turned_on: bool,
    /// The spec's `name` (the sweep's id starts with it).
    pub name: Option<String>,
}

/// A variant's identity for telling variants that make the same images apart: the spec as the
/// sampler uses it, with guidance that never acts (λ = 0, or t_stop ≥ steps) written one way.
fn output_identity(spec: &JobSpec) -> String {
    let mut spec = spec.clone();
    if spec.sampling.guidance_scale == 0.0 || spec.sampling.stop_guidance >= spec.sampling.steps {
        spec.sampling.guidance_scale = 0.0;
        spec.sampling.stop_guidance = spec.sampling.steps;
    }
    serde_json::to_string(&spec).expect("serialisable")
}

/// `text` with the lines of its `[sweep]` table emptied (line numbers kept), when the table is
/// written as a `[sweep]` header and its key lines; `None` for other layouts.
fn without_sweep_lines(text: &str) -> Option<String> {
    let header = |line: &str| {
        let line = line.split('#').next().unwrap_or_default().trim();
        line.starts_with('[')
            && line.ends_with(']')
            && !line.contains(',')
            && line.trim_matches(|c| c == '[' || c == ']').chars().all(|c| c.is_alphanumeric() || "_-.\"' ".contains(c))
    };
    let mut inside = false;
    let mut out = Vec::new();
    for line in text.split('\n') {
        if header(line) {
            let name = line.split('#').next().unwrap_or_default().trim().trim_matches(|c| c == '[' || c == ']').trim();
            inside = name == "sweep" || name.starts_with("sweep.");
        }
        out.push(if inside { "" } else { line });
    }
    let blanked = out.join("\n");
    match toml::from_str::<toml::Table>(&blanked) {
        Ok(table) if !table.contains_key("sweep") => Some(blanked),
        _ => None,
    }
}

impl Sweep {
    /// Reads a job spec that may hold a `[sweep]` table: `Ok(None)` when it has none (a plain
    /// job), else every variant expanded and checked as its own job spec.
    ///
    /// # Errors
    /// [`JobError::Toml`] / [`JobError::Shape`] as [`JobSpec::from_toml`] for the document
    /// without `[sweep]`; [`JobError::Invalid`] naming the sweep key (`sweep.stop_guidance`) for
    /// an unknown key (with the nearest key), a value that is not a list, an empty list, a value
    /// of the wrong type or out of range (with the variant), `variants` together with grid keys,
    /// more variants than the cap (with the count), and two variants that make the same job.
    pub fn parse(text: &str) -> Result<Option<Sweep>, JobError> {
        crate::job::refuse_oversized(text)?;
        let Ok(mut document) = toml::from_str::<toml::Table>(text) else {
            // Not TOML: said with its line, as for any spec.
            return JobSpec::from_toml(text).map(|_| None);
        };
        let Some(table) = document.remove("sweep") else { return Ok(None) };
        // The rest is an ordinary spec: its mistakes read as they would without the sweep, at
        // their own lines.
        let base_text = without_sweep_lines(text).unwrap_or_else(|| toml::to_string(&document).unwrap_or_default());
        let base = JobSpec::from_toml(&base_text)?;
        let mut problems = Vec::new();
        let mut bad = |field: String, problem: String| problems.push(FieldError { field, problem });
        let toml::Value::Table(table) = table else {
            bad("sweep".into(), "must be a table of settings, each with a list of values".into());
            return Err(JobError::Invalid(problems));
        };
        let mut cap = DEFAULT_MAX_VARIANTS;
        let mut grid: Vec<(SweepKey, Vec<toml::Value>)> = Vec::new();
        let mut listed: Option<Vec<Vec<(SweepKey, toml::Value)>>> = None;
        // Keys other than `max_variants`, known or not: an unknown one is said as such, not as
        // an empty sweep.
        let named = table.keys().filter(|k| *k != "max_variants").count();
        for (name, value) in table {
            match name.as_str() {
                "max_variants" => match value.as_integer() {
                    Some(n) if n >= 1 && n as u64 <= HARD_MAX_VARIANTS as u64 => cap = n as usize,
                    Some(n) if n >= 1 => {
                        cap = HARD_MAX_VARIANTS;
                        bad(
                            "sweep.max_variants".into(),
                            format!(
                                "{n} is more than the {HARD_MAX_VARIANTS} variants one sweep may have: split the sweep"
                            ),
                        )
                    }
                    _ => bad("sweep.max_variants".into(), format!("{value} is not a whole number ≥ 1")),
                },
                "variants" => match value {
                    toml::Value::Array(entries) if entries.is_empty() => {
                        bad("sweep.variants".into(), "the list is empty: give at least one variant".into())
                    }
                    toml::Value::Array(entries) => {
                        let mut variants = Vec::new();
                        for (i, entry) in entries.into_iter().enumerate() {
                            let field = format!("sweep.variants[{i}]");
                            let toml::Value::Table(entry) = entry else {
                                bad(
                                    field,
                                    format!("{entry} is not a table of settings (`{{ guidance_scale = 0.1 }}`)"),
                                );
                                continue;
                            };
                            let mut settings = Vec::new();
                            for (name, value) in entry {
                                match SweepKey::from_name(&name) {
                                    None => bad(format!("{field}.{name}"), unknown_key(&name, false)),
                                    Some(key) => match key.type_problem(&value) {
                                        Some(problem) => bad(format!("{field}.{name}"), problem),
                                        None => settings.push((key, value)),
                                    },
                                }
                            }
                            variants.push(settings);
                        }
                        listed = Some(variants);
                    }
                    other => bad("sweep.variants".into(), format!("{other} is not a list of tables of settings")),
                },
                _ => {
                    let field = format!("sweep.{name}");
                    let Some(key) = SweepKey::from_name(&name) else {
                        bad(field, unknown_key(&name, true));
                        continue;
                    };
                    let toml::Value::Array(values) = value else {
                        bad(
                            field,
                            format!("{value} is not a list: write `{name} = [{value}]` (or leave it out of the sweep)"),
                        );
                        continue;
                    };
                    if values.is_empty() {
                        bad(field, "the list is empty: give at least one value".into());
                        continue;
                    }
                    let mut kept = Vec::new();
                    // Seen values by their text: a long list is checked in linear time.
                    let mut seen = std::collections::HashSet::new();
                    for (i, value) in values.into_iter().enumerate() {
                        if let Some(problem) = key.type_problem(&value) {
                            bad(format!("{field}[{i}]"), problem);
                        } else if !seen.insert(value.to_string()) {
                            bad(field.clone(), format!("{value} is listed twice"));
                        } else {
                            kept.push(value);
                        }
                    }
                    // A list with no usable value is told above; the others still expand.
                    if !kept.is_empty() {
                        grid.push((key, kept));
                    }
                }
            }
        }
        if listed.is_some() && !grid.is_empty() {
            bad(
                "sweep".into(),
                format!(
                    "has both `variants` and lists of values ({}): use one — a grid of lists, or every variant in `variants`",
                    grid.iter().map(|(k, _)| k.name()).collect::<Vec<_>>().join(", ")
                ),
            );
        }
        if named == 0 {
            bad(
                "sweep".into(),
                "names no setting: give lists of values (`guidance_scale = [0.05, 0.1]`) or `variants`".into(),
            );
        }
        let lengths: Vec<usize> = grid.iter().map(|(_, values)| values.len().max(1)).collect();
        // A grid too large to count is said as the product of its lists' lengths.
        let (count, said) = match &listed {
            Some(variants) => (variants.len(), variants.len().to_string()),
            None => match lengths.iter().try_fold(1usize, |n, v| n.checked_mul(*v)) {
                Some(count) => (count, count.to_string()),
                None => (
                    usize::MAX,
                    format!(
                        "{} (more than can be counted)",
                        grid.iter()
                            .map(|(key, values)| format!("{} {}", values.len().max(1), key.name()))
                            .collect::<Vec<_>>()
                            .join(" × ")
                    ),
                ),
            },
        };
        if count > HARD_MAX_VARIANTS {
            bad(
                "sweep".into(),
                format!(
                    "expands to {said} variants, more than the {HARD_MAX_VARIANTS} one sweep may have: shorten a list, or split the sweep"
                ),
            );
        } else if count > cap {
            bad(
                "sweep".into(),
                format!(
                    "expands to {count} variants, more than the cap of {cap}: shorten a list, or raise the cap with `max_variants = {count}` in [sweep]"
                ),
            );
        }
        // A grid past the cap or both forms: nothing sensible to expand. Otherwise what is valid is
        // expanded and checked too, so every problem is told at once.
        if count > cap || (listed.is_some() && !grid.is_empty()) {
            return Err(JobError::Invalid(problems));
        }
        let settings: Vec<Vec<(SweepKey, toml::Value)>> = match listed {
            Some(listed) => listed,
            None => grid.iter().fold(vec![Vec::new()], |acc, (key, values)| {
                acc.iter()
                    .flat_map(|prefix| {
                        values.iter().map(move |value| {
                            let mut next = prefix.clone();
                            next.push((*key, value.clone()));
                            next
                        })
                    })
                    .collect()
            }),
        };
        let keys: Vec<SweepKey> = {
            let mut keys: Vec<SweepKey> = settings.iter().flatten().map(|(k, _)| *k).collect();
            keys.sort();
            keys.dedup();
            if grid.is_empty() { keys } else { grid.iter().map(|(k, _)| *k).collect() }
        };
        let cache_turned_on = base.latent_cache.is_none();
        let mut variants: Vec<Variant> = Vec::with_capacity(settings.len());
        // Output identity → (variant number from 1, index among the kept variants).
        let mut seen: HashMap<String, (usize, usize)> = HashMap::new();
        // The document's own mistakes, told once as they would be without the sweep.
        // Only those some variant has: a value every variant overrides (the default t_stop 25
        // beside `steps = 10` when t_stop is swept) is no problem of any job.
        let base_problems: Vec<FieldError> = match base.validate() {
            Err(JobError::Invalid(errors)) => errors,
            _ => Vec::new(),
        };
        let mut base_seen = vec![false; base_problems.len()];
        // A swept value out of range: (field, value, problem) → the variants (from 1) it is in,
        // told as one line.
        let mut out_of_range: Vec<(OutOfRange, Vec<(usize, String)>)> = Vec::new();
        for (i, set) in settings.into_iter().enumerate() {
            let mut doc = document.clone();
            if cache_turned_on {
                doc.insert("latent_cache".into(), toml::Value::Boolean(true));
            }
            for (key, value) in &set {
                key.apply(&mut doc, value.clone());
            }
            let spec = match JobSpec::deserialize(toml::Value::Table(doc.clone())) {
                Ok(spec) => spec,
                Err(error) => {
                    let error = error.to_string().replace('\n', " ");
                    let problem = format!("variant {}: {}", i + 1, error.trim());
                    problems.push(FieldError { field: "sweep".into(), problem });
                    continue;
                }
            };
            let described = |spec: &JobSpec| match keys.is_empty() {
                true => "the spec as written".to_owned(),
                false => keys.iter().map(|k| format!("{k}={}", k.value_in(spec))).collect::<Vec<_>>().join(" "),
            };
            if let Err(JobError::Invalid(errors)) = spec.validate() {
                for error in errors {
                    match set.iter().find(|(key, _)| key.spec_key() == error.field) {
                        Some((key, value)) => {
                            let at = (format!("sweep.{key}"), value.to_string(), error.problem.clone());
                            let variant = (i + 1, described(&spec));
                            match out_of_range.iter_mut().find(|(seen, _)| *seen == at) {
                                Some((_, variants)) => variants.push(variant),
                                None => out_of_range.push((at, vec![variant])),
                            }
                        }
                        // The document's own mistake: told once, below.
                        None if base_problems.contains(&error) => {
                            if let Some(k) = base_problems.iter().position(|b| *b == error) {
                                base_seen[k] = true;
                            }
                        }
                        // Another setting's problem that this variant's values cause (t_stop
                        // above a swept `steps`): named with the variant.
                        None => problems.push(FieldError {
                            field: error.field,
                            problem: format!("in variant {} ({}): {}", i + 1, described(&spec), error.problem),
                        }),
                    }
                }
                continue;
            }
            let identity = output_identity(&spec);
            if let Some(&(number, earlier)) = seen.get(&identity) {
                let earlier = &variants[earlier].spec;
                let why = if spec == *earlier {
                    "the same settings"
                } else {
                    "the same images: guidance never acts when λ is 0 or t_stop ≥ steps, whatever the other is"
                };
                problems.push(FieldError {
                    field: "sweep".into(),
                    problem: format!(
                        "variants {} ({}) and {} ({}) make {why}; drop one (list the wanted ones in `variants` if a grid makes it)",
                        number,
                        described(earlier),
                        i + 1,
                        described(&spec)
                    ),
                });
                continue;
            }
            seen.insert(identity, (i + 1, variants.len()));
            let toml = toml::to_string(&doc).unwrap_or_default();
            let settings = keys.iter().map(|k| (*k, k.value_in(&spec))).collect();
            variants.push(Variant { settings, spec, toml });
        }
        for ((field, value, problem), variants) in out_of_range {
            let problem = match variants.as_slice() {
                [(number, label)] => format!("{value} in variant {number} ({label}): {problem}"),
                // A value out of range in thousands of variants is said once, with the first few.
                many => format!(
                    "{value} in variants {}{}: {problem}",
                    many.iter().take(10).map(|(n, _)| n.to_string()).collect::<Vec<_>>().join(", "),
                    if many.len() > 10 { format!(" and {} more", many.len() - 10) } else { String::new() }
                ),
            };
            problems.push(FieldError { field, problem });
        }
        problems.extend(base_problems.into_iter().zip(base_seen).filter(|(_, seen)| *seen).map(|(p, _)| p));
        // One line per problem, however many variants or values repeat it.
        let mut told = std::collections::HashSet::new();
        problems.retain(|p| told.insert(p.to_string()));
        if !problems.is_empty() {
            return Err(JobError::Invalid(problems));
        }
        Ok(Some(Sweep { keys, variants, cache_turned_on, name: base.name }))
    }
}

/// A swept value's problem, told once for every variant it is in: (field, value, problem).
type OutOfRange = (String, String, String);

/// "not a sweep key", with the nearest key when one is close, and what the keys are.
fn unknown_key(name: &str, grid: bool) -> String {
    let near = SweepKey::ALL
        .into_iter()
        .map(|k| (crate::job::edit_distance(name, k.name()), k.name()))
        .min()
        .filter(|(d, _)| *d <= 2.max(name.len() / 3))
        // `guidance` for `guidance_scale`, `stop` for `stop_guidance`.
        .or_else(|| {
            let prefix = SweepKey::ALL.into_iter().filter(|k| name.len() >= 3 && k.name().contains(name));
            prefix.map(|k| (0, k.name())).next()
        });
    let keys = SweepKey::ALL.map(SweepKey::name).join(", ");
    let extra = if grid { ", plus `variants` and `max_variants`" } else { "" };
    match near {
        Some((_, k)) => format!("`{name}` is not a sweep key; did you mean `{k}`? (sweep keys: {keys}{extra})"),
        None => format!("`{name}` is not a sweep key (sweep keys: {keys}{extra})"),
    }
}

/// The id of a sweep: its name (or `job`, as for jobs), `-sweep-`, and 12 hex digits of a digest of its
/// variants' job fingerprints in order, so the same sweep submitted again has the same id.
pub fn sweep_id(name: Option<&str>, fingerprints: &[String]) -> String {
    let digest = crate::sha256_hex(fingerprints.join("\n").as_bytes());
    let hex = digest.trim_start_matches("sha256:");
    format!("{}-sweep-{}", name.unwrap_or("job"), &hex[..12])
}

/// One variant as a sweep's record keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VariantRecord {
    /// The variant's job id.
    pub job_id: String,
    /// Its fingerprint (`sha256:<hex>`).
    pub fingerprint: String,
    /// The swept settings by key (`guidance_scale` → `0.1`).
    pub settings: BTreeMap<String, String>,
}

/// `sweeps/<sweep>.json` in the coordinator's store (and `<output>/sweeps/<sweep>/sweep.json`
/// beside the variants' outputs, for the comparison report offline): which jobs a sweep is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepRecord {
    /// [`SWEEP_SCHEMA_VERSION`].
    pub schema_version: u32,
    /// The sweep's id ([`sweep_id`]).
    pub sweep_id: String,
    /// The swept keys, in the sweep's order (the comparison's columns).
    pub keys: Vec<String>,
    /// The variants, in the sweep's order.
    pub variants: Vec<VariantRecord>,
    /// Where the variants write (`<output>/jobs/<job>/`).
    pub output: String,
    /// When the sweep was first submitted, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
}

impl SweepRecord {
    /// Key of the record in the coordinator's store, and below a variant's output.
    pub fn key(sweep_id: &str) -> String {
        format!("sweeps/{sweep_id}.json")
    }

    /// The settings of `variant` in the sweep's key order, `key=value` joined by spaces.
    pub fn label(&self, variant: &VariantRecord) -> String {
        self.keys
            .iter()
            .map(|k| format!("{k}={}", variant.settings.get(k).map_or("", String::as_str)))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"name = "abl"
dataset = "/data/train"
classes = ["n01", "n02"]
labels = "position"
ipc = 10
models = { dit = "/m/dit.onnx", vae_encoder = "/m/enc.onnx", vae_decoder = "/m/dec.onnx" }
"#;

    fn sweep(extra: &str) -> Result<Option<Sweep>, JobError> {
        Sweep::parse(&format!("{BASE}{extra}"))
    }

    fn problems(extra: &str) -> Vec<FieldError> {
        match sweep(extra) {
            Err(JobError::Invalid(problems)) => problems,
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn a_spec_without_sweep_is_no_sweep() {
        assert!(sweep("").unwrap().is_none());
    }

    #[test]
    fn a_grid_expands_with_the_last_key_fastest_and_each_variant_is_the_spec_written_alone() {
        let s = sweep("[sweep]\nguidance_scale = [0.05, 0.1, 0.2]\nstop_guidance = [15, 25, 35]\n").unwrap().unwrap();
        assert_eq!(s.keys, vec![SweepKey::GuidanceScale, SweepKey::StopGuidance]);
        assert_eq!(s.variants.len(), 9);
        assert_eq!(s.variants[0].label(), "guidance_scale=0.05 stop_guidance=15");
        assert_eq!(s.variants[1].label(), "guidance_scale=0.05 stop_guidance=25");
        assert_eq!(s.variants[8].label(), "guidance_scale=0.2 stop_guidance=35");
        assert!(s.cache_turned_on);
        for v in &s.variants {
            // The variant's own document, read as a plain job spec, is the variant's spec.
            assert_eq!(JobSpec::from_toml(&v.toml).unwrap(), v.spec);
        }
        // ... and the job written by hand is the same job (the cache is operational).
        let alone = JobSpec::from_toml(&format!(
            "{BASE}latent_cache = true\n[sampling]\nguidance_scale = 0.1\nstop_guidance = 35\n"
        ))
        .unwrap();
        assert_eq!(s.variants[5].spec, alone);
    }

    #[test]
    fn ipc_seed_and_sampler_sweep_and_variants_list_non_grid_sets() {
        let s = sweep("[sweep]\nipc = [10, 50]\nsampler = [\"ddpm\", \"ddim\"]\n").unwrap().unwrap();
        assert_eq!(s.variants.len(), 4);
        assert_eq!(s.variants[3].spec.ipc, 50);
        assert_eq!(s.variants[3].spec.sampling.sampler, crate::job::SamplerKind::Ddim);
        let s = sweep(
            "latent_cache = false\n[sweep]\nvariants = [{}, { guidance_scale = 0.2, stop_guidance = 10 }, { seed = 3 }]\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.keys, vec![SweepKey::Seed, SweepKey::GuidanceScale, SweepKey::StopGuidance]);
        assert_eq!(s.variants.len(), 3);
        assert_eq!(s.variants[0].label(), "seed=0 guidance_scale=0.1 stop_guidance=25");
        assert_eq!(s.variants[2].spec.seed, 3);
        assert!(!s.cache_turned_on, "an explicit latent_cache is kept");
    }

    #[test]
    fn bad_sweeps_name_the_key_and_what_to_do() {
        let p = problems("[sweep]\nguidance = [0.1]\nstop_guidance = []\nipc = 10\ncfg_scale = [\"x\"]\n");
        let text: Vec<String> = p.iter().map(ToString::to_string).collect();
        assert!(
            text.iter().any(|t| t.contains("`sweep.guidance`") && t.contains("did you mean `guidance_scale`")),
            "{text:?}"
        );
        assert!(text.iter().any(|t| t.contains("`sweep.stop_guidance`") && t.contains("empty")), "{text:?}");
        assert!(text.iter().any(|t| t.contains("`sweep.ipc`") && t.contains("not a list")), "{text:?}");
        assert!(text.iter().any(|t| t.contains("`sweep.cfg_scale[0]`") && t.contains("not a number")), "{text:?}");
        // Out of range: named by the sweep key, with the variant.
        let p = problems("[sweep]\nstop_guidance = [25, 60]\nipc = [0, 10]\n");
        let text: Vec<String> = p.iter().map(ToString::to_string).collect();
        assert!(
            text.iter().any(|t| t.contains("`sweep.stop_guidance`") && t.contains("60") && t.contains("exceeds")),
            "{text:?}"
        );
        assert!(text.iter().any(|t| t.contains("`sweep.ipc`") && t.contains("at least 1")), "{text:?}");
        // A grid past the cap, with the count; the cap can be raised.
        let p = problems(
            "[sweep]\nseed = [1,2,3,4,5,6,7,8,9,10,11]\nguidance_scale = [0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0]\n",
        );
        assert!(p[0].problem.contains("110 variants") && p[0].problem.contains("max_variants"), "{p:?}");
        // A grid of millions with the cap raised past the ceiling is refused before it is
        // expanded (it took 10 GB and minutes, then listed every variant).
        let huge = "[sweep]\nmax_variants = 100000000000\nseed = [0,1,2,3,4,5,6,7,8,9]\nipc = [1,2,3,4,5,6,7,8,9,10]\n\
                    guidance_scale = [0.01,0.02,0.03,0.04,0.05,0.06,0.07,0.08,0.09,0.1]\nstop_guidance = [0,1,2,3,4,5,6,7]\n\
                    cfg_scale = [1.0,2.0,3.0,4.0,5.0,6.0,7.0,8.0,9.0,10.0]\n";
        let started = std::time::Instant::now();
        let p = problems(huge);
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "the grid was expanded");
        assert!(
            p.iter().any(|p| p.field == "sweep.max_variants" && p.problem.contains("more than the 10000")),
            "{p:?}"
        );
        assert!(
            p.iter().any(|p| p.problem.contains("expands to 80000 variants") && p.problem.contains("split")),
            "{p:?}"
        );
        // A grid too large to count says so, not 18446744073709551615 variants.
        let lists: String =
            ["ipc", "seed", "guidance_scale", "stop_guidance", "cfg_scale", "cfg_channels", "steps", "eta"]
                .iter()
                .map(|key| format!("{key} = [{}]\n", (1..=300).map(|v| v.to_string()).collect::<Vec<_>>().join(",")))
                .collect();
        let p = problems(&format!("[sweep]\n{lists}"));
        assert!(
            p.iter().any(|p| p.problem.contains(
                "expands to 300 cfg_channels × 300 cfg_scale × 300 eta × 300 guidance_scale × 300 ipc × 300 seed × 300 steps × 300 stop_guidance (more than can be counted) variants"
            )),
            "{p:?}"
        );
        assert!(!format!("{p:?}").contains(&usize::MAX.to_string()), "{p:?}");
        // A spec larger than any spec needs (300,000 variants written out) is refused unread.
        let listed: String = (0..300_000).map(|i| format!("{{ seed = {i} }},")).collect();
        let error = Sweep::parse(&format!("[sweep]\nvariants = [{listed}]\n")).unwrap_err();
        assert!(matches!(error, JobError::TooLarge { .. }), "{error}");
        assert!(error.to_string().contains("more than the 4 MiB a spec may be"), "{error}");
        // A list of many values is checked for repeats in linear time (it was quadratic).
        let long: String = (0..200_000).map(|v| format!("{v},")).collect();
        let p = problems(&format!("[sweep]\nseed = [{long} 7]\n"));
        assert!(p.iter().any(|p| p.problem.contains("7 is listed twice")), "{p:?}");
        assert_eq!(
            sweep("[sweep]\nmax_variants = 110\nseed = [1,2,3,4,5,6,7,8,9,10,11]\nguidance_scale = [0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0]\n")
                .unwrap()
                .unwrap()
                .variants
                .len(),
            110
        );
        // Grid and list together; an empty table.
        assert!(problems("[sweep]\nipc = [1]\nvariants = [{ seed = 1 }]\n")[0].problem.contains("both"));
        assert!(problems("[sweep]\n")[0].problem.contains("names no setting"));
        // A base mistake reads as it would without the sweep.
        assert!(
            matches!(Sweep::parse(&format!("{BASE}ipcc = 3\n[sweep]\nseed = [1]\n")), Err(JobError::Shape(m)) if m.contains("line 7") && m.contains("did you mean `ipc`"))
        );
    }

    #[test]
    fn every_problem_is_told_at_once_and_each_names_its_variant() {
        // A misspelt key beside range errors of the valid keys: all of them.
        let p = problems("[sweep]\nguidance_scal = [0.1]\nipc = [0, 2]\nstop_guidance = [3, 50]\n");
        let text: Vec<String> = p.iter().map(ToString::to_string).collect();
        assert!(text.iter().any(|t| t.contains("`sweep.guidance_scal`")), "{text:?}");
        assert!(text.iter().any(|t| t.contains("`sweep.ipc`") && t.contains("at least 1")), "{text:?}");
        // A listed variant that is not a table beside others' range errors.
        let p = problems("[sweep]\nvariants = [{ ipc = 0 }, 5, { sampler = \"ddim\", eta = 2 }]\n");
        let text: Vec<String> = p.iter().map(ToString::to_string).collect();
        assert!(text.iter().any(|t| t.contains("`sweep.variants[1]`")), "{text:?}");
        assert!(text.iter().any(|t| t.contains("`sweep.ipc`")), "{text:?}");
        assert!(text.iter().any(|t| t.contains("`sweep.eta`") && t.contains("outside 0..=1")), "{text:?}");
        // Another setting's problem a swept value causes names the variant.
        let p = problems("[sweep]\nsteps = [4, 10]\n");
        assert!(
            p.iter().any(|e| e.field == "sampling.stop_guidance" && e.problem.contains("in variant 1 (steps=4)")),
            "{p:?}"
        );
        // A sampler that does not exist, said as such; a value repeated is told once.
        let p = problems("[sweep]\nsampler = [\"ddpm\", \"foo\"]\n");
        assert!(p[0].to_string().contains("`sweep.sampler[1]`") && p[0].problem.contains("ddpm"), "{p:?}");
        let p = problems("[sweep]\nguidance_scale = [0.1, 0.10, 1e-1]\n");
        assert_eq!(p.len(), 1, "{p:?}");
        let p = problems("[sweep]\nvariants = [{}, {}]\n");
        assert!(p[0].problem.contains("(the spec as written)"), "{p:?}");
    }

    #[test]
    fn type_errors_hide_no_range_errors_and_swept_defaults_are_not_checked() {
        // Reported together: an unknown key, a non-list, a wrong type, an empty list, and the
        // range error of the valid list beside them.
        let p = problems(
            "[sampling]\nsteps = 10\n[sweep]\nguidance_scal = [0.1]\nstop_guidance = [3, 60]\nseed = []\neta = 0.5\ncfg_scale = [\"x\"]\n",
        );
        let text: Vec<String> = p.iter().map(ToString::to_string).collect();
        for expected in [
            "`sweep.guidance_scal`",
            "`sweep.stop_guidance`: 60",
            "`sweep.seed`",
            "`sweep.eta`",
            "`sweep.cfg_scale[0]`",
        ] {
            assert!(text.iter().any(|t| t.contains(expected)), "{expected}: {text:?}");
        }
        // The default t_stop (25) beside `steps = 10` is overridden by every variant: no problem.
        let s = sweep("[sampling]\nsteps = 10\n[sweep]\nstop_guidance = [3, 6]\n").unwrap().unwrap();
        assert_eq!(s.variants.len(), 2);
        // ... but a listed `{}` variant uses it, and is told so.
        let p = problems("[sampling]\nsteps = 10\n[sweep]\nvariants = [{}, { stop_guidance = 3 }]\n");
        assert!(p.iter().any(|e| e.field == "sampling.stop_guidance" && e.problem.contains("25")), "{p:?}");
        // One bad value in a grid is one line, naming its variants.
        let p = problems("[sweep]\nipc = [0, 2]\nseed = [1, 2]\nguidance_scale = [0.05, 0.1]\n");
        let ipc: Vec<&FieldError> = p.iter().filter(|e| e.field == "sweep.ipc").collect();
        assert_eq!(ipc.len(), 1, "{p:?}");
        assert!(ipc[0].problem.starts_with("0 in variants 1, 2, 5, 6:"), "{p:?}");
    }

    #[test]
    fn variants_that_make_the_same_job_are_refused() {
        // The same settings twice.
        let p = problems("[sweep]\nvariants = [{ seed = 1 }, { seed = 1 }]\n");
        assert!(p[0].problem.contains("variants 1") && p[0].problem.contains("the same settings"), "{p:?}");
        let p = problems("[sweep]\nguidance_scale = [0.1, 0.1]\n");
        assert!(p[0].problem.contains("listed twice"), "{p:?}");
        // Different settings, the same images: no guidance either way.
        let p = problems("[sweep]\nguidance_scale = [0, 0.1]\nstop_guidance = [25, 50]\n");
        // λ 0 at t_stop 25 and 50, and λ 0.1 at t_stop 50: three variants of one output.
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].problem.contains("variants 1") && p[0].problem.contains("and 2 "), "{p:?}");
        assert!(p[1].problem.contains("and 4 ") && p[1].problem.contains("guidance never acts"), "{p:?}");
    }

    #[test]
    fn sweep_ids_follow_the_variants() {
        let a = sweep_id(Some("abl"), &["sha256:1".into(), "sha256:2".into()]);
        assert!(a.starts_with("abl-sweep-") && a.len() == "abl-sweep-".len() + 12);
        assert_eq!(a, sweep_id(Some("abl"), &["sha256:1".into(), "sha256:2".into()]));
        assert_ne!(a, sweep_id(Some("abl"), &["sha256:2".into(), "sha256:1".into()]));
        assert!(sweep_id(None, &[]).starts_with("job-sweep-"));
    }
}
