//! The batch policy: how many items each model gets per call and how much decoded data a worker
//! keeps in flight. One type, built from the worker's flags (`--dit-rows`/`--max-batch`,
//! `--vae-batch`, `--vae-encode-batch`, `--vae-decode-batch`), reported at registration and used
//! by the coordinator to size shards. The DiT and the VAE need different numbers: a VAE
//! decoder's activations per image are ~100× a DiT row's, so one number cannot suit both.
//!
//! These are upper bounds. Each model's call is further bounded by the element ceiling read from
//! the model at load and by out-of-memory backoff (`mgd3_onnx`); neither changes any sample.

use serde::{Deserialize, Serialize};

/// Rows per DiT call when the worker is given none (`--dit-rows`, spelled `--max-batch` before).
pub const DEFAULT_DIT_ROWS: usize = 64;
/// Images per VAE encoder or decoder call when the worker is given none (`--vae-batch`).
pub const DEFAULT_VAE_BATCH: usize = 64;
/// Images per chunk the data stage hands the encoder.
pub const DEFAULT_ENCODE_CHUNK: usize = 64;
/// Chunks of decoded images queued between the data stage and the encoder.
pub const DEFAULT_QUEUE_DEPTH: usize = 2;

/// How much each model call and the data stage carry. Every field is at least 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchPolicy {
    /// Rows per DiT call; a sample takes two rows (conditional and unconditional), so a call
    /// holds [`BatchPolicy::samples_per_call`] samples.
    pub dit_rows: usize,
    /// Images per VAE encoder call.
    pub encode_images: usize,
    /// Images (latents) per VAE decoder call.
    pub decode_images: usize,
    /// Images per chunk the data stage decodes and hands the encoder (`[n,3,S,S]` f32 each).
    pub encode_chunk: usize,
    /// Chunks queued between the data stage and the encoder: with the chunk being read and
    /// the one being encoded, `queue_depth + 2` chunks of decoded images are in memory at most.
    pub queue_depth: usize,
}

impl Default for BatchPolicy {
    fn default() -> Self {
        BatchPolicy {
            dit_rows: DEFAULT_DIT_ROWS,
            encode_images: DEFAULT_VAE_BATCH,
            decode_images: DEFAULT_VAE_BATCH,
            encode_chunk: DEFAULT_ENCODE_CHUNK,
            queue_depth: DEFAULT_QUEUE_DEPTH,
        }
    }
}

/// Samples per DiT call of `dit_rows` rows (cond + uncond per sample), at least 1: the one place
/// that halves a row count.
pub const fn samples_per_call(dit_rows: usize) -> usize {
    if dit_rows / 2 == 0 { 1 } else { dit_rows / 2 }
}

impl BatchPolicy {
    /// Samples per DiT call: [`samples_per_call`] of [`BatchPolicy::dit_rows`].
    pub const fn samples_per_call(&self) -> usize {
        samples_per_call(self.dit_rows)
    }

    /// Each field that is 0, by the flag that sets it (empty when the policy is usable).
    pub fn problems(&self) -> Vec<&'static str> {
        [
            (self.dit_rows, "--dit-rows (--max-batch)"),
            (self.encode_images, "--vae-encode-batch (--vae-batch)"),
            (self.decode_images, "--vae-decode-batch (--vae-batch)"),
            (self.encode_chunk, "the encode chunk"),
            (self.queue_depth, "the queue depth"),
        ]
        .into_iter()
        .filter(|(value, _)| *value == 0)
        .map(|(_, flag)| flag)
        .collect()
    }
}

impl std::fmt::Display for BatchPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DiT {} rows ({} sample{}) per call, VAE encode {} / decode {} images per call, chunks of {} images, {} queued",
            self.dit_rows,
            self.samples_per_call(),
            if self.samples_per_call() == 1 { "" } else { "s" },
            self.encode_images,
            self.decode_images,
            self.encode_chunk,
            self.queue_depth
        )
    }
}

/// The DiT rows a job's shards are sized for, and where the number came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlannedRows {
    /// No worker had reported its policy: [`DEFAULT_DIT_ROWS`].
    Default,
    /// The largest `dit_rows` among the `workers` registered workers that reported one.
    Reported {
        /// Rows per DiT call.
        dit_rows: usize,
        /// Workers that reported.
        workers: usize,
    },
}

impl PlannedRows {
    /// Rows per DiT call the shards are sized for.
    pub fn dit_rows(&self) -> usize {
        match self {
            PlannedRows::Default => DEFAULT_DIT_ROWS,
            PlannedRows::Reported { dit_rows, .. } => *dit_rows,
        }
    }

    /// The plan from the rows the registered workers reported (any order): the largest, so a
    /// shard fills the biggest worker's calls (a smaller worker runs more calls per shard).
    pub fn from_reports(rows: impl IntoIterator<Item = usize>) -> Self {
        let (mut largest, mut workers) = (0, 0);
        for r in rows.into_iter().filter(|r| *r > 0) {
            largest = largest.max(r);
            workers += 1;
        }
        if workers == 0 { PlannedRows::Default } else { PlannedRows::Reported { dit_rows: largest, workers } }
    }
}

impl std::fmt::Display for PlannedRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlannedRows::Default => write!(
                f,
                "shards are sized for DiT calls of the default {DEFAULT_DIT_ROWS} rows: no worker had registered when \
                 the job was planned (set classes_per_shard, or submit once the workers run to size them by what \
                 the workers report)"
            ),
            PlannedRows::Reported { dit_rows, workers } => write!(
                f,
                "shards are sized for DiT calls of {dit_rows} rows, the largest --dit-rows of the {workers} \
                 registered worker(s), with at least one shard per worker (a worker with --dit-rows auto, the \
                 default on CUDA, reports {DEFAULT_DIT_ROWS} until it has loaded a job's models, then the rows it \
                 chose; set classes_per_shard to size the shards yourself)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_per_call_halves_rows_and_is_at_least_one() {
        assert_eq!(samples_per_call(64), 32);
        assert_eq!(samples_per_call(5), 2);
        assert_eq!(samples_per_call(1), 1);
        assert_eq!(samples_per_call(0), 1);
        assert_eq!(BatchPolicy { dit_rows: 512, ..Default::default() }.samples_per_call(), 256);
    }

    #[test]
    fn zero_fields_are_named_by_their_flag() {
        assert!(BatchPolicy::default().problems().is_empty());
        let bad = BatchPolicy { dit_rows: 0, decode_images: 0, ..Default::default() };
        assert_eq!(bad.problems(), ["--dit-rows (--max-batch)", "--vae-decode-batch (--vae-batch)"]);
    }

    #[test]
    fn planning_takes_the_largest_report_and_says_where_it_came_from() {
        assert_eq!(PlannedRows::from_reports([]), PlannedRows::Default);
        assert_eq!(PlannedRows::from_reports([0]), PlannedRows::Default);
        assert_eq!(PlannedRows::Default.dit_rows(), DEFAULT_DIT_ROWS);
        let planned = PlannedRows::from_reports([64, 512, 256]);
        assert_eq!(planned, PlannedRows::Reported { dit_rows: 512, workers: 3 });
        assert!(planned.to_string().contains("512 rows"), "{planned}");
        assert!(PlannedRows::Default.to_string().contains("no worker had registered"));
    }
}
