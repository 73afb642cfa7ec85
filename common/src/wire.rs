//! The one place where protocol messages become domain types and back: job status
//! ([`crate::status`]), leased classes ([`ClassRef`]) and the protocol-version header every
//! request carries.
//!
//! Enums arrive as `i32` on the wire; a value this build does not know (a newer coordinator) is
//! a [`WireError`] naming the field, never a silent default.

use crate::batch::BatchPolicy;
use crate::imagefolder::ListingSummary;
use crate::job::{ClassRef, DataChange};
use crate::lease::{Completion, Disposition, Exclusion, Failure, Registration, RunningLease};
use crate::proto;
use crate::status::{
    JobState, JobStatus, ShardCounts, ShardFailure, ShardPhase, ShardStatus, VerifyProblem, VerifyReport,
    WorkerExclusion, WorkerRows,
};

/// The metadata header carrying the sender's [`crate::PROTOCOL_VERSION`] on every request.
pub const PROTOCOL_HEADER: &str = "mgd3-protocol";

/// A protocol message this build cannot turn into a domain value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// An enum field holds a value this build does not know.
    #[error(
        "field `{field}` holds value {value}, which this mgd3 does not know: the coordinator runs a newer protocol; run the same mgd3 version everywhere"
    )]
    UnknownEnum {
        /// The field, as `Message.field`.
        field: &'static str,
        /// The value received.
        value: i32,
    },
}

impl From<proto::RegisterWorkerRequest> for Registration {
    fn from(r: proto::RegisterWorkerRequest) -> Self {
        Registration {
            worker_id: r.worker_id,
            hostname: r.hostname,
            devices: r.devices,
            protocol_version: r.protocol_version,
            model_fingerprints: r.model_fingerprints.into_iter().collect(),
            pid: r.pid,
            instance: r.instance,
            batch_policy: r.batch_policy.map(BatchPolicy::from),
        }
    }
}

impl From<proto::BatchPolicy> for BatchPolicy {
    fn from(p: proto::BatchPolicy) -> Self {
        let n = |v: u32| v as usize;
        BatchPolicy {
            dit_rows: n(p.dit_rows),
            encode_images: n(p.encode_images),
            decode_images: n(p.decode_images),
            encode_chunk: n(p.encode_chunk),
            queue_depth: n(p.queue_depth),
        }
    }
}

impl From<BatchPolicy> for proto::BatchPolicy {
    fn from(p: BatchPolicy) -> Self {
        let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        proto::BatchPolicy {
            dit_rows: n(p.dit_rows),
            encode_images: n(p.encode_images),
            decode_images: n(p.decode_images),
            encode_chunk: n(p.encode_chunk),
            queue_depth: n(p.queue_depth),
        }
    }
}

impl From<Registration> for proto::RegisterWorkerRequest {
    fn from(r: Registration) -> Self {
        proto::RegisterWorkerRequest {
            worker_id: r.worker_id,
            hostname: r.hostname,
            devices: r.devices,
            protocol_version: r.protocol_version,
            model_fingerprints: r.model_fingerprints.into_iter().collect(),
            pid: r.pid,
            instance: r.instance,
            batch_policy: r.batch_policy.map(proto::BatchPolicy::from),
        }
    }
}

impl From<Exclusion> for proto::JobExclusion {
    fn from(e: Exclusion) -> Self {
        proto::JobExclusion { job_id: e.job_id, reason: e.reason }
    }
}

impl From<&proto::RunningLease> for RunningLease {
    fn from(r: &proto::RunningLease) -> Self {
        RunningLease {
            lease_id: r.lease_id.clone(),
            images_done: r.images_done,
            classes_done: r.classes_done,
            image_steps_done: r.image_steps_done,
        }
    }
}

impl From<RunningLease> for proto::RunningLease {
    fn from(r: RunningLease) -> Self {
        proto::RunningLease {
            lease_id: r.lease_id,
            images_done: r.images_done,
            classes_done: r.classes_done,
            image_steps_done: r.image_steps_done,
        }
    }
}

impl From<proto::CompleteShardRequest> for Completion {
    fn from(r: proto::CompleteShardRequest) -> Self {
        Completion {
            worker_id: r.worker_id,
            lease_id: r.lease_id,
            manifest_digest: r.manifest_digest,
            images: r.images,
            seconds: r.seconds,
        }
    }
}

impl From<Completion> for proto::CompleteShardRequest {
    fn from(c: Completion) -> Self {
        proto::CompleteShardRequest {
            worker_id: c.worker_id,
            lease_id: c.lease_id,
            manifest_digest: c.manifest_digest,
            images: c.images,
            seconds: c.seconds,
        }
    }
}

impl From<proto::FailShardRequest> for Failure {
    /// The wire's three flags as one disposition: `released` wins, then `incompatible`, then
    /// `retryable`.
    fn from(r: proto::FailShardRequest) -> Self {
        let disposition = if r.released {
            Disposition::Release
        } else if r.store_refused {
            Disposition::Pause
        } else if r.incompatible {
            Disposition::Elsewhere
        } else if r.retryable {
            Disposition::Retry
        } else {
            Disposition::GiveUp
        };
        Failure {
            worker_id: r.worker_id,
            lease_id: r.lease_id,
            class: (!r.wnid.is_empty()).then_some(r.wnid),
            error: r.error,
            disposition,
            classes_committed: r.classes_committed,
        }
    }
}

impl From<Failure> for proto::FailShardRequest {
    fn from(f: Failure) -> Self {
        proto::FailShardRequest {
            worker_id: f.worker_id,
            lease_id: f.lease_id,
            error: f.error,
            retryable: f.disposition != Disposition::GiveUp,
            released: f.disposition == Disposition::Release,
            wnid: f.class.unwrap_or_default(),
            incompatible: f.disposition == Disposition::Elsewhere,
            store_refused: f.disposition == Disposition::Pause,
            classes_committed: f.classes_committed,
        }
    }
}

impl From<VerifyReport> for proto::VerifyJobResponse {
    fn from(r: VerifyReport) -> Self {
        proto::VerifyJobResponse {
            classes_checked: r.classes_checked,
            files_checked: r.files_checked,
            problems: r
                .problems
                .into_iter()
                .map(|p| proto::VerifyProblem { wnid: p.wnid, file: p.file.unwrap_or_default(), problem: p.problem })
                .collect(),
            classes_committed: r.classes_committed,
            running: r.running,
            state: r.state.map_or(proto::JobState::Unspecified, proto::JobState::from) as i32,
            sheets_missing: r.sheets_missing,
        }
    }
}

impl From<proto::VerifyJobResponse> for VerifyReport {
    fn from(r: proto::VerifyJobResponse) -> Self {
        VerifyReport {
            classes_checked: r.classes_checked,
            files_checked: r.files_checked,
            problems: r
                .problems
                .into_iter()
                .map(|p| VerifyProblem {
                    wnid: p.wnid,
                    file: (!p.file.is_empty()).then_some(p.file),
                    problem: p.problem,
                })
                .collect(),
            classes_committed: r.classes_committed,
            running: r.running,
            state: job_state(r.state).ok(),
            sheets_missing: r.sheets_missing,
        }
    }
}

impl From<&ClassRef> for proto::ClassAssignment {
    fn from(class: &ClassRef) -> Self {
        proto::ClassAssignment {
            wnid: class.wnid.clone(),
            label: class.label,
            class_index: class.class_index,
            listing: class.listing.as_ref().map(proto::ListingSummary::from),
        }
    }
}

impl From<proto::ClassAssignment> for ClassRef {
    fn from(class: proto::ClassAssignment) -> Self {
        ClassRef {
            wnid: class.wnid,
            label: class.label,
            class_index: class.class_index,
            listing: class.listing.map(ListingSummary::from),
        }
    }
}

impl From<&ListingSummary> for proto::ListingSummary {
    fn from(l: &ListingSummary) -> Self {
        proto::ListingSummary {
            digest: l.digest.clone(),
            names_digest: l.names_digest.clone(),
            images: l.images,
            bytes: l.bytes,
            content_digest: l.content_digest.clone().unwrap_or_default(),
        }
    }
}

impl From<proto::ListingSummary> for ListingSummary {
    fn from(l: proto::ListingSummary) -> Self {
        ListingSummary {
            digest: l.digest,
            names_digest: l.names_digest,
            images: l.images,
            bytes: l.bytes,
            content_digest: Some(l.content_digest).filter(|d| !d.is_empty()),
        }
    }
}

impl From<&DataChange> for proto::DataChange {
    fn from(change: &DataChange) -> Self {
        proto::DataChange {
            wnid: change.wnid.clone(),
            then: Some((&change.then).into()),
            now: Some((&change.now).into()),
            was_committed: change.was_committed,
        }
    }
}

impl From<proto::DataChange> for DataChange {
    fn from(change: proto::DataChange) -> Self {
        let summary = |l: Option<proto::ListingSummary>| l.map(ListingSummary::from).unwrap_or_else(empty_summary);
        DataChange {
            wnid: change.wnid,
            then: summary(change.then),
            now: summary(change.now),
            was_committed: change.was_committed,
        }
    }
}

fn empty_summary() -> ListingSummary {
    ListingSummary { digest: String::new(), names_digest: String::new(), images: 0, bytes: 0, content_digest: None }
}

impl From<JobState> for proto::JobState {
    fn from(state: JobState) -> Self {
        match state {
            JobState::Running => proto::JobState::Running,
            JobState::Succeeded => proto::JobState::Succeeded,
            JobState::Failed => proto::JobState::Failed,
            JobState::Cancelled => proto::JobState::Cancelled,
            JobState::Quarantined => proto::JobState::Quarantined,
            JobState::Paused => proto::JobState::Paused,
        }
    }
}

fn job_state(value: i32) -> Result<JobState, WireError> {
    match proto::JobState::try_from(value) {
        Ok(proto::JobState::Running) => Ok(JobState::Running),
        Ok(proto::JobState::Succeeded) => Ok(JobState::Succeeded),
        Ok(proto::JobState::Failed) => Ok(JobState::Failed),
        Ok(proto::JobState::Cancelled) => Ok(JobState::Cancelled),
        Ok(proto::JobState::Quarantined) => Ok(JobState::Quarantined),
        Ok(proto::JobState::Paused) => Ok(JobState::Paused),
        Ok(proto::JobState::Unspecified) | Err(_) => Err(WireError::UnknownEnum { field: "JobStatus.state", value }),
    }
}

impl From<ShardPhase> for proto::ShardState {
    fn from(phase: ShardPhase) -> Self {
        match phase {
            ShardPhase::Pending => proto::ShardState::Pending,
            ShardPhase::Leased => proto::ShardState::Leased,
            ShardPhase::Done => proto::ShardState::Done,
            ShardPhase::Failed => proto::ShardState::Failed,
        }
    }
}

fn shard_phase(value: i32) -> Result<ShardPhase, WireError> {
    match proto::ShardState::try_from(value) {
        Ok(proto::ShardState::Pending) => Ok(ShardPhase::Pending),
        Ok(proto::ShardState::Leased) => Ok(ShardPhase::Leased),
        Ok(proto::ShardState::Done) => Ok(ShardPhase::Done),
        Ok(proto::ShardState::Failed) => Ok(ShardPhase::Failed),
        Ok(proto::ShardState::Unspecified) | Err(_) => {
            Err(WireError::UnknownEnum { field: "ShardSummary.state", value })
        }
    }
}

impl From<JobStatus> for proto::JobStatus {
    fn from(s: JobStatus) -> Self {
        proto::JobStatus {
            job_id: s.job_id,
            state: proto::JobState::from(s.state) as i32,
            shards_total: s.shards.total,
            shards_done: s.shards.done,
            shards_running: s.shards.running,
            shards_pending: s.shards.pending,
            shards_failed: s.shards.failed,
            images_done: s.images_done,
            images_total: s.images_total,
            images_per_second: s.images_per_second,
            // Negative: not estimable (proto3 has no optional doubles worth the churn).
            eta_seconds: s.eta_seconds.filter(|e| e.is_finite()).unwrap_or(-1.0),
            failures: s
                .failures
                .into_iter()
                .map(|f| proto::ShardFailure {
                    shard_index: f.shard_index,
                    wnid: f.wnid,
                    error: f.error,
                    attempts: f.attempts,
                    retrying: f.retrying,
                })
                .collect(),
            fingerprint: s.fingerprint,
            created_unix_ms: s.created_unix_ms,
            finished_unix_ms: s.finished_unix_ms.unwrap_or(0),
            workers: s.workers,
            workers_excluded: s.workers_excluded,
            exclusions: s
                .exclusions
                .into_iter()
                .map(|e| proto::WorkerExclusion { worker_id: e.worker_id, reason: e.reason })
                .collect(),
            worker_rows: s
                .worker_rows
                .into_iter()
                .map(|r| proto::WorkerRows { worker_id: r.worker_id, dit_rows: r.dit_rows })
                .collect(),
            output: s.output,
            classes_done: s.classes_done,
            classes_total: s.classes_total,
            run_started_unix_ms: s.run_started_unix_ms,
            store_unheld_since_unix_ms: s.store_unheld_since_unix_ms.unwrap_or(0),
            shards: s
                .shard_list
                .into_iter()
                .map(|sh| proto::ShardSummary {
                    shard_index: sh.index,
                    state: proto::ShardState::from(sh.phase) as i32,
                    attempts: sh.attempts,
                    classes: sh.classes,
                    classes_done: sh.classes_done,
                    images_done: sh.images_done,
                    worker_id: sh.worker.unwrap_or_default(),
                })
                .collect(),
        }
    }
}

impl TryFrom<proto::JobStatus> for JobStatus {
    type Error = WireError;

    fn try_from(s: proto::JobStatus) -> Result<Self, WireError> {
        Ok(JobStatus {
            state: job_state(s.state)?,
            shards: ShardCounts {
                total: s.shards_total,
                done: s.shards_done,
                running: s.shards_running,
                pending: s.shards_pending,
                failed: s.shards_failed,
            },
            classes_done: s.classes_done,
            classes_total: s.classes_total,
            images_done: s.images_done,
            images_total: s.images_total,
            images_per_second: s.images_per_second,
            eta_seconds: (s.eta_seconds >= 0.0).then_some(s.eta_seconds),
            run_started_unix_ms: s.run_started_unix_ms,
            store_unheld_since_unix_ms: (s.store_unheld_since_unix_ms > 0).then_some(s.store_unheld_since_unix_ms),
            failures: s
                .failures
                .into_iter()
                .map(|f| ShardFailure {
                    shard_index: f.shard_index,
                    wnid: f.wnid,
                    error: f.error,
                    attempts: f.attempts,
                    retrying: f.retrying,
                })
                .collect(),
            fingerprint: s.fingerprint,
            created_unix_ms: s.created_unix_ms,
            finished_unix_ms: (s.finished_unix_ms > 0).then_some(s.finished_unix_ms),
            workers: s.workers,
            workers_excluded: s.workers_excluded,
            exclusions: s
                .exclusions
                .into_iter()
                .map(|e| WorkerExclusion { worker_id: e.worker_id, reason: e.reason })
                .collect(),
            worker_rows: s
                .worker_rows
                .into_iter()
                .map(|r| WorkerRows { worker_id: r.worker_id, dit_rows: r.dit_rows })
                .collect(),
            output: s.output,
            shard_list: s
                .shards
                .into_iter()
                .map(|sh| {
                    Ok(ShardStatus {
                        index: sh.shard_index,
                        phase: shard_phase(sh.state)?,
                        attempts: sh.attempts,
                        classes: sh.classes,
                        classes_done: sh.classes_done,
                        images_done: sh.images_done,
                        worker: (!sh.worker_id.is_empty()).then_some(sh.worker_id),
                    })
                })
                .collect::<Result<_, WireError>>()?,
            job_id: s.job_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A leased class reaches the worker with the listing submit recorded (and without one for
    /// jobs submitted before listings were recorded).
    #[test]
    fn a_class_travels_with_its_listing() {
        let listing = crate::imagefolder::ListingSummary {
            digest: "sha256:aa".into(),
            names_digest: "sha256:bb".into(),
            images: 1300,
            bytes: 123_456,
            content_digest: None,
        };
        let hashed = crate::imagefolder::ListingSummary { content_digest: Some("sha256:cc".into()), ..listing.clone() };
        for listing in [Some(listing), Some(hashed), None] {
            let class = ClassRef { wnid: "n01440764".into(), label: 0, class_index: 4, listing };
            assert_eq!(ClassRef::from(proto::ClassAssignment::from(&class)), class);
        }
    }

    fn sample() -> JobStatus {
        JobStatus {
            job_id: "j".into(),
            state: JobState::Running,
            fingerprint: "sha256:ab".into(),
            output: "file:///o/jobs/j".into(),
            shards: ShardCounts { total: 2, done: 1, running: 1, pending: 0, failed: 0 },
            classes_done: 3,
            classes_total: 4,
            images_done: 30,
            images_total: 40,
            images_per_second: 2.5,
            eta_seconds: Some(4.0),
            run_started_unix_ms: 5,
            failures: vec![ShardFailure {
                shard_index: 1,
                wnid: "c3".into(),
                error: "boom".into(),
                attempts: 2,
                retrying: true,
            }],
            created_unix_ms: 7,
            finished_unix_ms: None,
            workers: 1,
            workers_excluded: 1,
            exclusions: vec![WorkerExclusion { worker_id: "w".into(), reason: "its models differ".into() }],
            worker_rows: vec![WorkerRows { worker_id: "w".into(), dit_rows: 688 }],
            store_unheld_since_unix_ms: Some(9),
            shard_list: vec![
                ShardStatus {
                    index: 0,
                    phase: ShardPhase::Done,
                    attempts: 1,
                    classes: 2,
                    classes_done: 2,
                    images_done: 20,
                    worker: None,
                },
                ShardStatus {
                    index: 1,
                    phase: ShardPhase::Leased,
                    attempts: 2,
                    classes: 2,
                    classes_done: 1,
                    images_done: 10,
                    worker: Some("w0".into()),
                },
            ],
        }
    }

    #[test]
    fn status_survives_the_wire_unchanged() {
        for state in [
            JobState::Running,
            JobState::Succeeded,
            JobState::Failed,
            JobState::Cancelled,
            JobState::Quarantined,
            JobState::Paused,
        ] {
            let mut status = sample();
            status.state = state;
            status.eta_seconds = (state == JobState::Running).then_some(4.0);
            status.finished_unix_ms = state.is_final().then_some(9);
            assert_eq!(JobStatus::try_from(proto::JobStatus::from(status.clone())), Ok(status));
        }
    }

    #[test]
    fn failures_keep_their_disposition_across_the_wire() {
        for disposition in
            [Disposition::Retry, Disposition::GiveUp, Disposition::Elsewhere, Disposition::Release, Disposition::Pause]
        {
            for (class, classes_committed) in [(None, 0), (Some("n01440764".to_owned()), 3)] {
                let failure = Failure {
                    worker_id: "w".into(),
                    lease_id: "l".into(),
                    class,
                    error: "e".into(),
                    disposition,
                    classes_committed,
                };
                assert_eq!(Failure::from(proto::FailShardRequest::from(failure.clone())), failure);
            }
        }
        let registration = Registration {
            worker_id: "w".into(),
            hostname: "h".into(),
            devices: vec!["cuda:0".into()],
            protocol_version: crate::PROTOCOL_VERSION,
            model_fingerprints: [("/m/dit.onnx".to_owned(), "sha256:ab".to_owned())].into(),
            pid: 4242,
            instance: "5f0c".into(),
            batch_policy: Some(BatchPolicy { dit_rows: 512, decode_images: 16, ..Default::default() }),
        };
        assert_eq!(Registration::from(proto::RegisterWorkerRequest::from(registration.clone())), registration);
    }

    #[test]
    fn an_unknown_state_is_an_error_naming_the_field() {
        let mut wire = proto::JobStatus::from(sample());
        wire.state = 42;
        assert_eq!(
            JobStatus::try_from(wire.clone()),
            Err(WireError::UnknownEnum { field: "JobStatus.state", value: 42 })
        );
        wire.state = proto::JobState::Running as i32;
        wire.shards[0].state = 0;
        let error = JobStatus::try_from(wire).unwrap_err();
        assert!(error.to_string().contains("ShardSummary.state"), "{error}");
    }
}
