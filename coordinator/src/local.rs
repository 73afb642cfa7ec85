//! A coordinator served on a loopback port of this process, with a handle to stop it: how
//! `coordinator run`, the in-process cluster tests and the scale benchmark all start one, so they
//! exercise the same serving path (`serve` with its interceptor, background task and shutdown).

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::grpc::serve;
use crate::service::{Coordinator, ServeConfig};

/// A running in-process coordinator.
pub struct LocalCoordinator {
    /// The URL clients and workers connect to: `http://127.0.0.1:<port>`, or
    /// `https://localhost:<port>` when `config.tls` is set.
    pub url: String,
    /// The coordinator itself, for direct calls (status, drain, flush).
    pub coordinator: Coordinator,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<Result<()>>,
}

impl LocalCoordinator {
    /// Serves `coordinator` with `config` on loopback `port` (0: any free port).
    ///
    /// # Errors
    /// [`Error::Io`] when the port cannot be bound.
    pub async fn start(coordinator: Coordinator, config: ServeConfig, port: u16) -> Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.map_err(|source| Error::Io {
            what: "listener",
            path: format!("127.0.0.1:{port}"),
            source,
        })?;
        let port = listener
            .local_addr()
            .map_err(|source| Error::Io { what: "listener", path: "local address".into(), source })?
            .port();
        let url = match config.tls {
            Some(_) => format!("https://localhost:{port}"),
            None => format!("http://127.0.0.1:{port}"),
        };
        coordinator.advertise(&url, None, false).await;
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn({
            let coordinator = coordinator.clone();
            async move {
                serve(coordinator, &config, listener, async move {
                    let _ = stopped.await;
                })
                .await
            }
        });
        Ok(LocalCoordinator { url, coordinator, stop: Some(stop), server })
    }

    /// Stops serving (state is flushed and the store lock released, as on SIGTERM) and waits.
    ///
    /// # Errors
    /// What `serve` ended with; a panic in the server task is re-raised.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match (&mut self.server).await {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic.into_panic()),
        }
    }
}
