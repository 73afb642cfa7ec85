//! How a job's progress reads to a person: `coordinator status`'s text, the one-line progress of
//! `submit --wait` and `coordinator run` (a live bar in a terminal, a line every few seconds in a
//! Slurm log or a pipe), and the wait itself, which outlives a coordinator restart. The numbers
//! (rate over the last minute, ETA) come from the coordinator; nothing here estimates.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use mgd3_common::proto;
use mgd3_common::rpc::{CallError, Client};
use mgd3_common::status::{JobState, JobStatus};

/// How long `submit --wait` and `coordinator run` keep waiting for a coordinator that stopped
/// answering (it restarts and recovers the job from the store).
pub const WAIT_FOR_UNREACHABLE: Duration = Duration::from_secs(600);

/// The default seconds between progress lines without a terminal.
pub const DEFAULT_PROGRESS_EVERY_S: u64 = 30;

/// `secs` as a person reads it: `45 s`, `3 min 20 s`, `2 h 05 min`.
pub fn human(secs: f64) -> String {
    let secs = secs.max(0.0).round() as u64;
    match secs {
        0..60 => format!("{secs} s"),
        60..3600 => format!("{} min {:02} s", secs / 60, secs % 60),
        _ => format!("{} h {:02} min", secs / 3600, (secs % 3600) / 60),
    }
}

/// How long a finished job took, in seconds: from its submission to its end, and, when this
/// coordinator took it on later (recovered after a restart, resumed), the part since then —
/// only when that is at least 2 s and a tenth of the whole shorter: a submit that took a few
/// seconds to list the data before the job was taken on is not a second run.
fn elapsed(status: &JobStatus) -> Option<(f64, Option<f64>)> {
    let finished = status.finished_unix_ms?;
    let since = |start: u64| (start > 0 && finished >= start).then(|| (finished - start) as f64 / 1000.0);
    let total = since(status.created_unix_ms).or_else(|| since(status.run_started_unix_ms))?;
    let this_run = since(status.run_started_unix_ms).filter(|run| total - run >= 2.0_f64.max(total / 10.0));
    Some((total, this_run))
}

/// Rate and ETA, or the elapsed time of a finished job: `2.40 images/s, ETA 29 s`,
/// `ETA unknown`, `done in 41 s`.
pub fn pace(status: &JobStatus) -> String {
    if status.state.is_final() {
        return match elapsed(status) {
            Some((total, None)) => format!("{} in {}", status.state, human(total)),
            Some((total, Some(run))) => {
                format!(
                    "{} in {} ({} since it last started here: a resume or a coordinator restart)",
                    status.state,
                    human(total),
                    human(run)
                )
            }
            None => status.state.to_string(),
        };
    }
    match status.eta_seconds {
        Some(eta) if status.images_per_second > 0.0 => {
            format!("{:.2} images/s, ETA {}", status.images_per_second, human(eta))
        }
        _ => "ETA unknown".to_owned(),
    }
}

/// How long a job may run without a worker before that is worth a warning: workers started
/// together with the coordinator (`coordinator run`, `distill.sbatch`) register within it.
pub const NO_WORKER_GRACE_MS: u64 = 15_000;

/// The warning for a running job no worker has served for [`NO_WORKER_GRACE_MS`], naming what to
/// start.
pub fn no_worker_warning(status: &JobStatus, url: &str) -> Option<String> {
    let waited = mgd3_common::now_ms().saturating_sub(status.run_started_unix_ms);
    if status.state != JobState::Running || waited < NO_WORKER_GRACE_MS {
        return None;
    }
    if status.workers == 0 {
        return Some(format!("no worker is connected: start one with `worker --coordinator {url}`"));
    }
    all_excluded(status).then(|| {
        format!(
            "no eligible worker: every connected worker is excluded from this job: {}",
            exclusion_reasons(status).join("; ")
        )
    })
}

/// How long a coordinator may go without holding its store before status says so: a renewal
/// that is late by a few seconds is the usual slow store, not news.
pub const STORE_UNHELD_GRACE_MS: u64 = 15_000;

/// Seconds the answering coordinator has gone without holding its store, at `now_ms`, while the
/// job runs and once that is past [`STORE_UNHELD_GRACE_MS`].
fn store_unheld_for(status: &JobStatus, now_ms: u64) -> Option<f64> {
    let since = status.store_unheld_since_unix_ms?;
    let unheld = now_ms.saturating_sub(since);
    (!status.state.is_final() && unheld >= STORE_UNHELD_GRACE_MS).then_some(unheld as f64 / 1000.0)
}

/// The warning for a running job whose coordinator has not held its store for
/// [`STORE_UNHELD_GRACE_MS`] or longer.
pub fn store_warning(status: &JobStatus) -> Option<String> {
    store_unheld_for(status, mgd3_common::now_ms()).map(|seconds| {
        format!(
            "this coordinator has not held its store for {}: cut off from it, or taken over by another coordinator; \
             it commits and leases nothing until it holds it again",
            human(seconds)
        )
    })
}

/// True when the job runs, workers are connected, and this job has excluded every one of them.
fn all_excluded(status: &JobStatus) -> bool {
    status.state == JobState::Running && status.workers > 0 && status.workers_excluded >= status.workers
}

/// `worker, worker: reason` for each reason the job excluded connected workers for, as it was
/// said, in order of first appearance: workers that share a model and a runtime fail alike, and
/// the same long reason once per worker buries it.
fn exclusion_reasons(status: &JobStatus) -> Vec<String> {
    let mut grouped: Vec<(&str, Vec<&str>)> = Vec::new();
    for e in &status.exclusions {
        match grouped.iter_mut().find(|(reason, _)| *reason == e.reason) {
            Some((_, workers)) => workers.push(&e.worker_id),
            None => grouped.push((&e.reason, vec![&e.worker_id])),
        }
    }
    let reasons: Vec<String> = grouped
        .into_iter()
        .map(|(reason, workers)| {
            let workers = workers.join(", ");
            if reason.is_empty() { workers } else { format!("{workers}: {reason}") }
        })
        .collect();
    if reasons.is_empty() {
        vec![format!("{} worker(s), reasons not reported", status.workers_excluded)]
    } else {
        reasons
    }
}

/// One line of progress, for logs: `job J [running]: classes 3/10, images 30/100, 2.40
/// images/s, ETA 29 s, 2 workers`.
pub fn progress_line(status: &JobStatus, url: &str) -> String {
    let mut line = format!(
        "job {} [{}]: classes {}/{}, images {}/{}, {}, {} worker(s)",
        status.job_id,
        status.state,
        status.classes_done,
        status.classes_total,
        status.images_done,
        status.images_total,
        pace(status),
        status.workers
    );
    // A job another coordinator runs for now is leased nothing here: said on the one line too.
    let waiting = status
        .failures
        .iter()
        .any(|f| f.attempts == 0 && f.wnid.is_empty() && f.error.starts_with(WAITING))
        .then(|| "waiting: another coordinator runs the job (`coordinator status` says which)".to_owned());
    for warning in [waiting, store_warning(status), no_worker_warning(status, url)].into_iter().flatten() {
        line.push_str("; ");
        line.push_str(&warning);
    }
    line
}

/// How the problem line of a job another coordinator runs begins (see `Coordinator::status`).
pub const WAITING: &str = "waiting: ";

/// `DiT rows per call: 1024 (2 workers), 256 (1 worker)`: the rows the connected workers
/// reported, most first; `None` when none reported any.
fn rows_summary(status: &JobStatus) -> Option<String> {
    let mut counts: std::collections::BTreeMap<u32, usize> = std::collections::BTreeMap::new();
    for r in &status.worker_rows {
        *counts.entry(r.dit_rows).or_default() += 1;
    }
    let groups: Vec<String> =
        counts.iter().rev().map(|(rows, n)| format!("{rows} ({n} worker{})", if *n == 1 { "" } else { "s" })).collect();
    (!groups.is_empty()).then(|| format!("DiT rows per call: {}", groups.join(", ")))
}

/// `coordinator status`'s text for one job.
pub fn describe(status: &JobStatus, url: &str) -> String {
    if status.state == JobState::Quarantined {
        let reason = status.failures.first().map(|f| f.error.as_str()).unwrap_or_default();
        return format!("job {} [quarantined]\n  {reason}\n", status.job_id);
    }
    let shards = &status.shards;
    let mut workers = status.workers.to_string();
    if let Some(rows) = rows_summary(status) {
        workers.push_str(&format!(" ({rows})"));
    }
    if let Some(warning) = no_worker_warning(status, url) {
        workers.push_str(&format!(" — {warning}"));
    }
    let mut text = format!(
        "job {} [{}]\n  shards: {} done, {} running, {} pending, {} failed (of {})\n  classes: {}/{}\n  images: {}/{}, {}\n  workers: {}\n  output: {}\n",
        status.job_id,
        status.state,
        shards.done,
        shards.running,
        shards.pending,
        shards.failed,
        shards.total,
        status.classes_done,
        status.classes_total,
        status.images_done,
        status.images_total,
        pace(status),
        workers,
        status.output,
    );
    if let Some(warning) = store_warning(status) {
        text.push_str(&format!("  store: {warning}\n"));
    }
    if status.state == JobState::Paused {
        text.push_str(&format!(
            "  paused (why is below): once that is dealt with (free space, raise the quota, fix the permissions or \
             create the bucket, as it says; or the other coordinator is done with the job), run `coordinator resume \
             {}` or submit the job again (no attempt was spent)\n",
            status.job_id
        ));
    }
    // Workers the job excluded (models that differ, credentials that do not work), each with
    // its reason, unless the workers line above says it already (every connected one excluded).
    // A shard given back by one keeps the reason as its last error: said here, not as a failure
    // of the shard (it spent no attempt; the attempt it shows is the next worker's).
    let exclusions_shown = no_worker_warning(status, url).is_some();
    if !exclusions_shown {
        for e in &status.exclusions {
            text.push_str(&format!(
                "  excluded: worker {} (its shards go to other workers, no attempt spent): {}\n",
                e.worker_id, e.reason
            ));
        }
    }
    let shown = |f: &&mgd3_common::status::ShardFailure| status.exclusions.iter().any(|e| e.reason == f.error);
    for f in status.failures.iter().filter(|f| !shown(f)) {
        text.push_str(&failure_line(f));
    }
    text
}

/// One failure of `status`: `  failure: shard 3 class n01440764 after 3 attempt(s): …`, or
/// `  retrying: …` while the shard has attempts left and runs again. A shard's
/// error that spent no attempt is a `problem:` (`shard 3 class … (no attempt spent)`), and one of
/// the whole job (a refused manifest, a paused output) names no shard, class or attempts it does
/// not have.
fn failure_line(f: &mgd3_common::status::ShardFailure) -> String {
    if f.attempts == 0 && f.wnid.is_empty() {
        return format!("  problem: {}\n", f.error);
    }
    let class = if f.wnid.is_empty() { String::new() } else { format!(" class {}", f.wnid) };
    // An error that spent no attempt (a worker excluded, a lease given back) is no failure of
    // the shard, which the shards line does not count as failed either.
    if f.attempts == 0 {
        return format!("  problem: shard {}{class} (no attempt spent): {}\n", f.shard_index, f.error);
    }
    // Attempts left and another one under way or queued: not the end of the shard.
    if f.retrying {
        return format!(
            "  retrying: shard {}{class} ({} attempt(s) failed so far): {}\n",
            f.shard_index, f.attempts, f.error
        );
    }
    format!("  failure: shard {}{class} after {} attempt(s): {}\n", f.shard_index, f.attempts, f.error)
}

/// `GetJobStatus` as a domain status.
///
/// # Errors
/// A [`CallError`] naming the URL; a status this build cannot read.
pub async fn job_status(client: &mut Client, url: &str, job_id: &str) -> anyhow::Result<JobStatus> {
    let status = client
        .get_job_status(proto::GetJobStatusRequest { job_id: job_id.into() })
        .await
        .map_err(CallError::of(url, "GetJobStatus"))?
        .into_inner();
    Ok(JobStatus::try_from(status)?)
}

/// How progress is shown while waiting.
#[derive(Clone, Copy, Debug)]
pub struct ProgressOptions {
    /// Show nothing.
    pub quiet: bool,
    /// Without a terminal, one progress line this often.
    pub every: Duration,
}

/// Shows a job's progress while it runs: a bar on a terminal (with log lines printed above it),
/// else a line every `every`.
pub struct Progress {
    bar: ProgressBar,
    url: String,
    options: ProgressOptions,
    last_line: Option<Instant>,
    /// When the last "not answering" line was printed (without a terminal).
    last_unreachable: Option<Instant>,
}

impl Progress {
    /// Starts showing progress of the coordinator at `url`. On a terminal the bar takes over
    /// stderr: log lines and [`Progress::println`] print above it until [`Progress::finish`].
    pub fn new(url: &str, options: ProgressOptions) -> Self {
        let bar = if options.quiet { ProgressBar::hidden() } else { ProgressBar::new(0) };
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} images")
                .expect("template")
                .progress_chars("=> "),
        );
        if !bar.is_hidden() {
            let gate = bar.clone();
            mgd3_common::telemetry::set_stderr_gate(Some(std::sync::Arc::new(move |write: &mut dyn FnMut()| {
                gate.suspend(write)
            })));
        }
        Progress { bar, url: url.to_owned(), options, last_line: None, last_unreachable: None }
    }

    /// Prints `line` to stderr above the bar (or plainly without one).
    pub fn println(&self, line: &str) {
        mgd3_common::telemetry::write_stderr(format!("{line}\n").as_bytes());
    }

    /// Shows `status`.
    pub fn show(&mut self, status: &JobStatus) {
        if self.options.quiet {
            return;
        }
        if !self.bar.is_hidden() {
            self.bar.set_length(status.images_total);
            self.bar.set_position(status.images_done);
            let mut message = format!(
                "[{}] classes {}/{}, {}",
                status.state,
                status.classes_done,
                status.classes_total,
                pace(status)
            );
            if let Some(warning) = store_warning(status).or_else(|| no_worker_warning(status, &self.url)) {
                message = format!("[{}] {warning}", status.state);
            }
            self.bar.set_message(message);
            self.bar.tick();
        } else if self.last_line.is_none_or(|at| at.elapsed() >= self.options.every) || status.state.is_final() {
            self.last_line = Some(Instant::now());
            self.println(&progress_line(status, &self.url));
        }
    }

    /// Shows that the coordinator has not answered for `since`.
    fn unreachable(&mut self, since: Duration) {
        let line = format!(
            "the coordinator at {} is not answering ({}); waiting for it to come back",
            self.url,
            human(since.as_secs_f64())
        );
        if self.options.quiet {
            return;
        }
        if !self.bar.is_hidden() {
            self.bar.set_message(line);
            self.bar.tick();
        } else if self.last_unreachable.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
            self.last_unreachable = Some(Instant::now());
            self.println(&line);
        }
    }

    /// Removes the bar and gives stderr back to plain writes.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
        mgd3_common::telemetry::set_stderr_gate(None);
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Polls a job until it ends, showing its progress; returns its final status. A coordinator that
/// stops answering is waited for up to [`WAIT_FOR_UNREACHABLE`] (it recovers the job when it
/// comes back).
///
/// # Errors
/// The call's error once the coordinator has not answered for [`WAIT_FOR_UNREACHABLE`], an error
/// once it has answered for that long that it does not hold its store, or at
/// once for an error a restart does not cure (an unknown job, a refused token);
/// [`mgd3_common::NoWorker`] once every connected worker has been excluded from the job for
/// `excluded_grace` (`None` waits for ever).
pub async fn wait_for(
    client: &mut Client,
    job_id: &str,
    progress: &mut Progress,
    excluded_grace: Option<Duration>,
) -> anyhow::Result<JobStatus> {
    let url = progress.url.clone();
    let mut unreachable_since: Option<Instant> = None;
    let mut excluded_since: Option<Instant> = None;
    loop {
        match job_status(client, &url, job_id).await {
            Ok(status) => {
                unreachable_since = None;
                progress.show(&status);
                if status.state.is_final() {
                    progress.finish();
                    return Ok(status);
                }
                // Every connected worker excluded, for longer than the grace: no one will run
                // the job, and waiting would idle the allocation.
                if all_excluded(&status) {
                    let since = *excluded_since.get_or_insert_with(Instant::now);
                    if excluded_grace.is_some_and(|grace| since.elapsed() >= grace) {
                        progress.finish();
                        return Err(mgd3_common::NoWorker {
                            job: job_id.to_owned(),
                            reasons: exclusion_reasons(&status),
                        }
                        .into());
                    }
                } else {
                    excluded_since = None;
                }
                // A coordinator cut off from its store for as long as one that does not answer
                // is waited for: it makes no progress, and the store may have another one by now.
                if let Some(seconds) = store_unheld_for(&status, mgd3_common::now_ms())
                    && seconds >= WAIT_FOR_UNREACHABLE.as_secs_f64()
                {
                    progress.finish();
                    anyhow::bail!(
                        "job {job_id}: the coordinator at {url} has not held its store for {}, so the job makes no \
                         progress there (it is cut off from the store, or another coordinator took the store over); \
                         the job goes on under the coordinator that holds the store: `coordinator status {job_id} \
                         --coordinator URL` of that one, or of this one once it holds its store again",
                        human(seconds)
                    );
                }
            }
            Err(error)
                if error
                    .downcast_ref::<CallError>()
                    .is_some_and(|e| matches!(e.code(), tonic::Code::Unavailable | tonic::Code::Unknown)) =>
            {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= WAIT_FOR_UNREACHABLE {
                    return Err(error.context(format!(
                        "the coordinator has not answered for {}; the job may still be running: \
                         `coordinator status {job_id}` once it is back",
                        human(since.elapsed().as_secs_f64())
                    )));
                }
                progress.unreachable(since.elapsed());
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(error) => return Err(error),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mgd3_common::status::ShardCounts;

    /// A shard's failure names its shard, class and attempts; a problem of the whole job that
    /// spent none names none (no `class  after 0 attempt(s)`).
    #[test]
    fn a_failure_names_only_what_it_has() {
        let failure = |wnid: &str, attempts: u32| mgd3_common::status::ShardFailure {
            shard_index: 3,
            wnid: wnid.into(),
            error: "boom".into(),
            attempts,
            retrying: false,
        };
        assert_eq!(failure_line(&failure("n01", 3)), "  failure: shard 3 class n01 after 3 attempt(s): boom\n");
        assert_eq!(failure_line(&failure("", 2)), "  failure: shard 3 after 2 attempt(s): boom\n");
        assert_eq!(failure_line(&failure("n01", 0)), "  problem: shard 3 class n01 (no attempt spent): boom\n");
        assert_eq!(failure_line(&failure("", 0)), "  problem: boom\n");
        // A shard with attempts left, running again: its last error, not the end of it.
        let retried = mgd3_common::status::ShardFailure { retrying: true, ..failure("n01", 1) };
        assert_eq!(failure_line(&retried), "  retrying: shard 3 class n01 (1 attempt(s) failed so far): boom\n");
    }

    fn status(state: JobState, workers: u32, rate: f64, eta: Option<f64>) -> JobStatus {
        JobStatus {
            job_id: "j".into(),
            state,
            fingerprint: String::new(),
            output: "out/jobs/j".into(),
            shards: ShardCounts { total: 10, done: 3, running: 1, pending: 6, failed: 0 },
            classes_done: 3,
            classes_total: 10,
            images_done: 30,
            images_total: 100,
            images_per_second: rate,
            eta_seconds: eta,
            run_started_unix_ms: 1_000,
            failures: Vec::new(),
            created_unix_ms: 1_000,
            finished_unix_ms: state.is_final().then_some(42_000),
            workers,
            workers_excluded: 0,
            exclusions: Vec::new(),
            worker_rows: Vec::new(),
            shard_list: Vec::new(),
            store_unheld_since_unix_ms: None,
        }
    }

    /// A worker the job excluded while others run it is named with its reason, and the shard it
    /// gave back (whose last error is that reason, its attempt the next worker's) is no failure.
    #[test]
    fn an_excluded_worker_is_named_and_its_reason_is_no_shard_failure() {
        let mut s = status(JobState::Running, 2, 1.0, Some(10.0));
        let reason = "no AWS credentials found for profile `default`".to_owned();
        s.workers_excluded = 1;
        s.exclusions = vec![mgd3_common::status::WorkerExclusion { worker_id: "bad".into(), reason: reason.clone() }];
        s.failures = vec![mgd3_common::status::ShardFailure {
            shard_index: 0,
            wnid: "n01".into(),
            error: reason,
            attempts: 1,
            retrying: false,
        }];
        let text = describe(&s, "http://c");
        assert!(
            text.contains("  excluded: worker bad (its shards go to other workers, no attempt spent): no AWS"),
            "{text}"
        );
        assert!(!text.contains("failure:"), "{text}");
    }

    #[test]
    fn progress_reads_as_a_person_needs_it() {
        assert_eq!(human(45.2), "45 s");
        assert_eq!(human(200.0), "3 min 20 s");
        assert_eq!(human(7500.0), "2 h 05 min");
        let running = status(JobState::Running, 2, 2.4, Some(29.0));
        assert_eq!(
            progress_line(&running, "http://c:1"),
            "job j [running]: classes 3/10, images 30/100, 2.40 images/s, ETA 29 s, 2 worker(s)"
        );
        // Nothing committed in the last minute: no made-up ETA.
        assert!(progress_line(&status(JobState::Running, 2, 0.0, None), "u").contains("ETA unknown"));
        // Nobody serving the job is said, with what to start.
        let alone = describe(&status(JobState::Running, 0, 0.0, None), "http://c:1");
        assert!(
            alone.contains("workers: 0 — no worker is connected: start one with `worker --coordinator http://c:1`")
        );
        // A finished job shows how long it took, not an ETA.
        let done = describe(&status(JobState::Succeeded, 0, 2.4, None), "u");
        assert!(done.contains("images: 30/100, succeeded in 41 s") && !done.contains("ETA"), "{done}");
        assert!(!done.contains("no worker"), "{done}");
        // Submitted 2 min before this coordinator recovered it after a restart: the whole time,
        // and this run's part.
        let recovered = JobStatus {
            created_unix_ms: 1_000,
            run_started_unix_ms: 121_000,
            finished_unix_ms: Some(130_000),
            ..status(JobState::Succeeded, 0, 0.0, None)
        };
        assert!(
            pace(&recovered).ends_with(
                "succeeded in 2 min 09 s (9 s since it last started here: a resume or a coordinator restart)"
            ),
            "{}",
            pace(&recovered)
        );
        // A submit that listed the data for 4 s of a 90 s job: one run, one time.
        let listed = JobStatus {
            created_unix_ms: 1_000,
            run_started_unix_ms: 5_000,
            finished_unix_ms: Some(91_000),
            ..recovered
        };
        assert_eq!(pace(&listed), "succeeded in 1 min 30 s");
        // Workers connected, but every one excluded from this job: said, with why.
        let exclusion = |worker: &str, reason: &str| mgd3_common::status::WorkerExclusion {
            worker_id: worker.into(),
            reason: reason.into(),
        };
        let shunned = JobStatus {
            workers_excluded: 2,
            exclusions: vec![
                exclusion("w0", "cannot use cuda:0: the ONNX Runtime in use is a CPU build"),
                exclusion("w1", "has model `dit.onnx` loaded with fingerprint sha256:11"),
            ],
            ..status(JobState::Running, 2, 0.0, None)
        };
        let text = describe(&shunned, "u");
        assert!(
            text.contains("workers: 2 — no eligible worker: every connected worker is excluded from this job: w0: cannot use cuda:0"),
            "{text}"
        );
        assert!(progress_line(&shunned, "u").contains("w1: has model `dit.onnx`"));
        // The shard the excluded worker gave back carries the same reason: said once.
        let gave_back = JobStatus {
            failures: vec![mgd3_common::status::ShardFailure {
                shard_index: 0,
                wnid: "a".into(),
                error: "has model `dit.onnx` loaded with fingerprint sha256:11".into(),
                attempts: 0,
                retrying: false,
            }],
            ..shunned.clone()
        };
        let text = describe(&gave_back, "u");
        assert_eq!(text.matches("has model `dit.onnx`").count(), 1, "{text}");
        assert!(!text.contains("model files differ"), "the reasons as they are, nothing made up: {text}");
        // Workers refused for the same reason (one model, one runtime) share one mention of it.
        let alike = JobStatus {
            workers_excluded: 3,
            exclusions: vec![
                exclusion("local-0", "cannot load the job's models"),
                exclusion("w9", "has model `dit.onnx` loaded with fingerprint sha256:11"),
                exclusion("local-1", "cannot load the job's models"),
            ],
            ..status(JobState::Running, 3, 0.0, None)
        };
        assert_eq!(
            exclusion_reasons(&alike),
            [
                "local-0, local-1: cannot load the job's models",
                "w9: has model `dit.onnx` loaded with fingerprint sha256:11"
            ]
        );
        let some = JobStatus { workers_excluded: 1, ..status(JobState::Running, 2, 0.0, None) };
        // A coordinator cut off from its store says so once that has lasted 15 s, and not for
        // a job that is over.
        let cut_off = |ago_ms: u64, state| JobStatus {
            store_unheld_since_unix_ms: Some(mgd3_common::now_ms() - ago_ms),
            ..status(state, 2, 0.0, None)
        };
        assert_eq!(store_unheld_for(&cut_off(5_000, JobState::Running), mgd3_common::now_ms()), None);
        let text = describe(&cut_off(90_000, JobState::Running), "u");
        assert!(
            text.contains(
                "  store: this coordinator has not held its store for 1 min 30 s: cut off from it, or taken over"
            ),
            "{text}"
        );
        assert!(progress_line(&cut_off(90_000, JobState::Running), "u").contains("has not held its store"));
        assert!(!describe(&cut_off(90_000, JobState::Succeeded), "u").contains("store:"));
        assert!(!describe(&some, "u").contains("eligible"));
        // The rows each worker runs its DiT calls with (what `--dit-rows auto` chose), most first.
        let rows = |worker: &str, dit_rows: u32| mgd3_common::status::WorkerRows { worker_id: worker.into(), dit_rows };
        let sized = JobStatus {
            worker_rows: vec![rows("a", 256), rows("b", 1024), rows("c", 1024)],
            ..status(JobState::Running, 3, 2.4, Some(29.0))
        };
        let text = describe(&sized, "u");
        assert!(text.contains("workers: 3 (DiT rows per call: 1024 (2 workers), 256 (1 worker))\n"), "{text}");
        assert!(!describe(&running, "u").contains("DiT rows"), "no rows reported, none said");
    }
}
