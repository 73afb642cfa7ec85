//! The gRPC adapter: [`Service`] turns protocol messages into calls of the domain
//! [`Coordinator`] and its answers (and [`crate::Error`]s) back into messages and statuses;
//! [`serve`] runs it on a listener, with the token and protocol-version interceptor.

use std::future::Future;
use std::path::Path;

use mgd3_common::proto::coordinator_server::{Coordinator as CoordinatorRpc, CoordinatorServer};
use mgd3_common::proto::{self, poll_work_response::Action};
use mgd3_common::rpc::RequireToken;
use tokio::net::TcpListener;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};
use tracing::info;

use crate::error::{Error, Result};
use crate::lock::LockError;
use crate::scheduler::{LeaseGrant, PollDecision, Running};
use crate::service::{Coordinator, DataChanges, Resubmit, ServeConfig};

/// The gRPC adapter.
#[derive(Clone)]
pub struct Service(pub Coordinator);

type RpcResult<T> = std::result::Result<Response<T>, Status>;

#[tonic::async_trait]
impl CoordinatorRpc for Service {
    async fn register_worker(
        &self,
        request: Request<proto::RegisterWorkerRequest>,
    ) -> RpcResult<proto::RegisterWorkerResponse> {
        let request = request.into_inner();
        let worker_id = request.worker_id.clone();
        let (heartbeat_interval_ms, excluded) = self.0.register(request.into())?;
        Ok(Response::new(proto::RegisterWorkerResponse {
            worker_id,
            heartbeat_interval_ms,
            excluded: excluded.into_iter().map(Into::into).collect(),
        }))
    }

    async fn poll_work(&self, request: Request<proto::PollWorkRequest>) -> RpcResult<proto::PollWorkResponse> {
        let request = request.into_inner();
        let running: Vec<Running> = request.running.iter().map(Running::from).collect();
        let process = crate::scheduler::WorkerProcess {
            instance: request.instance.clone(),
            host: request.hostname.clone(),
            pid: request.pid,
        };
        let (decision, revoked) = self.0.poll(&request.worker_id, &process, &running, request.draining)?;
        if let Some(policy) = request.batch_policy {
            self.0.report_batch_policy(&request.worker_id, policy.into());
        }
        let action = match decision {
            PollDecision::Lease(grant) => Action::Lease(lease_message(grant)),
            PollDecision::Wait(ms) => Action::WaitMs(ms),
            PollDecision::Drain => Action::Drain(true),
        };
        Ok(Response::new(proto::PollWorkResponse { action: Some(action), revoked }))
    }

    async fn complete_shard(
        &self,
        request: Request<proto::CompleteShardRequest>,
    ) -> RpcResult<proto::CompleteShardResponse> {
        self.0.complete(request.into_inner().into()).await?;
        Ok(Response::new(proto::CompleteShardResponse {}))
    }

    async fn fail_shard(&self, request: Request<proto::FailShardRequest>) -> RpcResult<proto::FailShardResponse> {
        self.0.fail(request.into_inner().into())?;
        Ok(Response::new(proto::FailShardResponse {}))
    }

    async fn submit_job(&self, request: Request<proto::SubmitJobRequest>) -> RpcResult<proto::SubmitJobResponse> {
        self.0.await_store_held().await?;
        let r = request.into_inner();
        let data = Resubmit { data: DataChanges::from_flag(r.accept_data_changes), retry_failed: r.retry_failed };
        if let Some(sweep) = mgd3_common::sweep::Sweep::parse(&r.spec_toml).map_err(crate::Error::Job)? {
            if !r.job_id.is_empty() {
                return Err(tonic::Status::invalid_argument(format!(
                    "--job-id `{}` names one job, and a spec with [sweep] is several: each variant's id comes from its name and fingerprint",
                    r.job_id
                )));
            }
            let submitted = self.0.submit_sweep(&sweep, Path::new(&r.base_dir), data).await?;
            return Ok(Response::new(proto::SubmitJobResponse {
                job_id: submitted.record.sweep_id.clone(),
                fingerprint: String::new(),
                shards: submitted.jobs.iter().map(|(job, _)| job.shards.len() as u32).sum(),
                already_existed: submitted.jobs.iter().all(|(_, existed)| *existed),
                notes: submitted.notes,
                variants: submitted.jobs.iter().map(|(job, _)| job.job_id.clone()).collect(),
            }));
        }
        let (job, existed, notes) =
            self.0.submit_with(&r.spec_toml, Path::new(&r.base_dir), Some(r.job_id), data).await?;
        Ok(Response::new(proto::SubmitJobResponse {
            job_id: job.job_id.clone(),
            fingerprint: job.fingerprint.clone(),
            shards: job.shards.len() as u32,
            already_existed: existed,
            notes,
            variants: Vec::new(),
        }))
    }

    async fn get_sweep(&self, request: Request<proto::GetSweepRequest>) -> RpcResult<proto::GetSweepResponse> {
        let record = self.0.sweep(&request.into_inner().sweep_id).await?;
        Ok(Response::new(proto::GetSweepResponse {
            record_json: serde_json::to_string(&record).expect("serialisable"),
        }))
    }

    async fn get_job_status(&self, request: Request<proto::GetJobStatusRequest>) -> RpcResult<proto::JobStatus> {
        let job_id = request.into_inner().job_id;
        Ok(Response::new(self.0.explained(&job_id, self.0.status(&job_id)).await?.into()))
    }

    async fn resume_job(&self, request: Request<proto::ResumeJobRequest>) -> RpcResult<proto::ResumeJobResponse> {
        self.0.await_store_held().await?;
        let r = request.into_inner();
        let spec = (!r.spec_toml.is_empty()).then(|| (r.spec_toml.as_str(), Path::new(&r.base_dir)));
        let data = DataChanges::from_flag(r.accept_data_changes);
        let resumed = self.0.explained(&r.job_id, self.0.resume_with(&r.job_id, spec, data).await).await?;
        Ok(Response::new(proto::ResumeJobResponse {
            committed: resumed.committed as u32,
            requeued: resumed.requeued as u32,
            redone: resumed.redone,
            data_changed: resumed.data_changed.iter().map(proto::DataChange::from).collect(),
            sheets_restored: resumed.sheets.restored,
            sheets_removed: resumed.sheets.removed.into_iter().map(|(wnid, why)| format!("{wnid}: {why}")).collect(),
            sheets_left: resumed.sheets.left.into_iter().map(|(file, error)| format!("{file}: {error}")).collect(),
        }))
    }

    async fn verify_job(&self, request: Request<proto::VerifyJobRequest>) -> RpcResult<proto::VerifyJobResponse> {
        let job_id = request.into_inner().job_id;
        Ok(Response::new(self.0.explained(&job_id, self.0.verify(&job_id).await).await?.into()))
    }

    async fn cancel_job(&self, request: Request<proto::CancelJobRequest>) -> RpcResult<proto::CancelJobResponse> {
        self.0.await_store_held().await?;
        let job_id = request.into_inner().job_id;
        self.0.explained(&job_id, self.0.cancel(&job_id)).await?;
        Ok(Response::new(proto::CancelJobResponse {}))
    }

    async fn forget_job(&self, request: Request<proto::ForgetJobRequest>) -> RpcResult<proto::ForgetJobResponse> {
        self.0.await_store_held().await?;
        let job_id = request.into_inner().job_id;
        // A sweep's id forgets the sweep: its variants, then its record.
        match self.0.sweep(&job_id).await {
            Ok(_) => {
                let forgotten = self.0.forget_sweep(&job_id).await?;
                let kept_job_ids = forgotten.kept.into_iter().map(|(job, _)| job).collect();
                return Ok(Response::new(proto::ForgetJobResponse { outputs_kept: true, kept_job_ids }));
            }
            Err(crate::Error::UnknownSweep(_)) => {}
            Err(error) => return Err(error.into()),
        }
        let outputs_kept = self.0.explained(&job_id, self.0.forget(&job_id).await).await?;
        Ok(Response::new(proto::ForgetJobResponse { outputs_kept, kept_job_ids: Vec::new() }))
    }

    async fn list_sweeps(&self, _request: Request<proto::ListSweepsRequest>) -> RpcResult<proto::ListSweepsResponse> {
        let records = self.0.sweeps().await?;
        Ok(Response::new(proto::ListSweepsResponse {
            record_json: records.iter().map(|r| serde_json::to_string(r).expect("serialisable")).collect(),
        }))
    }

    async fn list_jobs(&self, _request: Request<proto::ListJobsRequest>) -> RpcResult<proto::ListJobsResponse> {
        Ok(Response::new(proto::ListJobsResponse { jobs: self.0.list().into_iter().map(Into::into).collect() }))
    }
}

/// A granted lease as the worker receives it: the resolved spec travels as JSON (see
/// docs/ARCHITECTURE.md, "The spec stays a document").
fn lease_message(grant: LeaseGrant) -> proto::Lease {
    proto::Lease {
        lease_id: grant.lease_id,
        job_id: grant.job.job_id.clone(),
        shard_index: grant.shard_index as u32,
        attempt: grant.attempt,
        attempt_id: grant.attempt_id,
        deadline_unix_ms: grant.deadline_ms,
        classes: grant.classes.iter().map(Into::into).collect(),
        spec_json: serde_json::to_string(&grant.job.spec).expect("serialisable spec"),
        spec_fingerprint: grant.job.fingerprint.clone(),
        lease_timeout_ms: grant.timeout_ms,
    }
}

/// How long a stopping coordinator lets calls in flight finish before it drops the connections
/// that are still open.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves the coordinator on `listener` until `shutdown` resolves (or another coordinator takes
/// the store over), with its background task; releases the store's lock on the way out.
///
/// # Errors
/// [`Error::Io`] when the listener has no address; [`Error::Transport`] for a TLS identity that
/// cannot be used or a server failure; [`Error::Lock`] when another coordinator took the store
/// over.
pub async fn serve(
    coordinator: Coordinator,
    config: &ServeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let addr =
        listener.local_addr().map_err(|source| Error::Io { what: "listener", path: "local address".into(), source })?;
    let service =
        CoordinatorServer::with_interceptor(Service(coordinator.clone()), RequireToken::new(config.token.as_deref()));
    mgd3_common::ensure_crypto_provider();
    let mut builder = Server::builder();
    if let Some((cert, key)) = &config.tls {
        builder = builder.tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))?;
    }
    // The URL to give workers and clients (`addr` stays, for scripts that read it).
    let url = crate::cli::advertised_url(&addr, config.tls.is_some());
    info!(%addr, %url, store = %coordinator.store_url(), auth = config.token.is_some(), tls = config.tls.is_some(), "coordinator serving");
    let (stop_background, background_stopped) = tokio::sync::oneshot::channel::<()>();
    let background = tokio::spawn(coordinator.clone().background(async move {
        let _ = background_stopped.await;
    }));
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let lost = {
        let coordinator = coordinator.clone();
        async move {
            coordinator.fenced().await;
        }
    };
    // Told when the stop comes, so that the grace period below starts then.
    let (stopping, stop_begun) = tokio::sync::oneshot::channel::<()>();
    let stop = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = lost => {}
        }
        let _ = stopping.send(());
    };
    // The standard gRPC health service (grpc.health.v1), open without a token or protocol header
    // so that launchers and probes can ask whether the coordinator serves: it does once `serve`
    // runs (recovery happened when the coordinator was opened).
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<CoordinatorServer<Service>>().await;
    let server = builder.add_service(health_service).add_service(service).serve_with_incoming_shutdown(incoming, stop);
    // A graceful shutdown waits for every connection to close, and an HTTP/2 client that never
    // answers the server's GOAWAY ping (a hung worker, a half-open socket, a hostile client, or
    // our own idle channel caught mid-handshake) would hold the coordinator, its lock and its
    // Ctrl-C open for ever: in-flight calls get SHUTDOWN_GRACE, then the connections are dropped.
    let grace = async {
        match stop_begun.await {
            Ok(()) => tokio::time::sleep(SHUTDOWN_GRACE).await,
            // The server ended by itself: it wins the race below.
            Err(_) => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        result = server => result,
        () = grace => {
            info!(grace_s = SHUTDOWN_GRACE.as_secs(), "connections still open after the shutdown grace period; closing them");
            Ok(())
        }
    };
    let _ = stop_background.send(());
    let _ = background.await;
    if coordinator.is_fenced() {
        let lost = coordinator.take_lost_to();
        return Err(Error::from(lost.unwrap_or(LockError::Lost {
            url: coordinator.store_url().to_owned(),
            host: "another host".into(),
            pid: 0,
        })));
    }
    coordinator.release().await;
    result.map_err(Error::from)
}
