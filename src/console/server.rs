//! The console's listener: plain HTTP/1.1, or HTTPS with the API's TLS material when the API
//! serves TLS (unless the console is told to stay plaintext behind a load balancer that ends
//! TLS). It stops when the shutdown token fires: no new connections, open ones finish their
//! request (the live streams end at shutdown too), then the task ends.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::ConsoleConfig;
use super::routes::{self, Console};
use crate::api::{InProcessApi, TlsError};

/// Why the console could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The address could not be bound.
    #[error("the console cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The API's TLS material cannot serve the console.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A running console.
#[derive(Debug)]
pub struct RunningConsole {
    /// Where it listens (useful with port 0).
    pub addr: SocketAddr,
    /// Whether it serves HTTPS.
    pub tls: bool,
    task: JoinHandle<()>,
}

impl RunningConsole {
    /// `http://addr` or `https://addr`.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Waits until the console has stopped (after the shutdown token fired).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Starts the console on `listen`, calling `api`, until `shutdown` fires. Returns once the
/// socket is bound.
///
/// # Errors
/// When the address cannot be bound or the API's TLS material cannot be used.
pub async fn start(
    api: InProcessApi,
    listen: SocketAddr,
    config: ConsoleConfig,
    shutdown: CancellationToken,
) -> Result<RunningConsole, ConsoleError> {
    let tls = match (&api.tls, config.plaintext) {
        (Some(t), false) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(
            t.rustls_server_config(&[b"http/1.1"])?,
        ))),
        _ => None,
    };
    let secure = tls.is_some() || config.secure_cookies;
    let console = Console::new(api, config, secure, shutdown.clone());
    let app = routes::router(console);
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| ConsoleError::Bind {
            addr: listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ConsoleError::Bind {
        addr: listen,
        source,
    })?;
    tracing::info!(%addr, tls = tls.is_some(), "web console listening");
    let serving_tls = tls.is_some();
    let task = tokio::spawn(async move {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a moment, keep serving.
                        tracing::warn!(error = %e, "console: accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let service = TowerToHyperService::new(app.clone());
            let builder = auto::Builder::new(TokioExecutor::new());
            match &tls {
                None => {
                    let conn = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .into_owned();
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, %peer, "console connection ended");
                        }
                    });
                }
                Some(acceptor) => {
                    let acceptor = acceptor.clone();
                    let watcher = graceful.watcher();
                    tokio::spawn(async move {
                        let stream = match tokio::time::timeout(
                            std::time::Duration::from_secs(10),
                            acceptor.accept(stream),
                        )
                        .await
                        {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, %peer, "console TLS handshake failed");
                                return;
                            }
                            Err(_) => return,
                        };
                        let conn = builder
                            .serve_connection_with_upgrades(TokioIo::new(stream), service)
                            .into_owned();
                        if let Err(e) = watcher.watch(conn).await {
                            tracing::debug!(error = %e, %peer, "console connection ended");
                        }
                    });
                }
            }
        }
        drop(listener);
        // Open connections finish the request they serve; idle keep-alive ones close now.
        if tokio::time::timeout(std::time::Duration::from_secs(10), graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("console: connections still open 10s after shutdown; leaving them");
        }
        tracing::info!(tls = serving_tls, "web console stopped");
    });
    Ok(RunningConsole {
        addr,
        tls: serving_tls,
        task,
    })
}
