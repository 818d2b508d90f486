//! The plugin's readiness check: can this engine reach the endpoint's host at all?
//!
//! `/readyz` runs it (with the engine's own checks) each time it is asked; while it fails the
//! engine reports not ready, with the reason. A TCP connection is enough: it proves the name
//! resolves and the port is open from here, without sending the endpoint a request it would
//! have to ignore.

use std::time::Duration;

use reqwest::Url;
use setpoint::plugin::HealthCheck;
use setpoint_adapter::BoxFuture;

/// How long a check may take.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Checks that a TCP connection to the endpoint's host and port opens.
#[derive(Debug, Clone)]
pub struct EndpointReachable {
    host: String,
    port: u16,
}

impl EndpointReachable {
    /// The check of `url`'s host and port (the scheme's default port when it names none).
    pub fn new(url: &Url) -> Self {
        Self {
            host: url.host_str().unwrap_or_default().to_owned(),
            port: url.port_or_known_default().unwrap_or(443),
        }
    }
}

impl HealthCheck for EndpointReachable {
    fn name(&self) -> &str {
        "webhook endpoint"
    }

    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let target = (self.host.as_str(), self.port);
            match tokio::time::timeout(CHECK_TIMEOUT, tokio::net::TcpStream::connect(target)).await
            {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("cannot reach {}:{}: {e}", self.host, self.port)),
                Err(_) => Err(format!(
                    "{}:{} did not accept a connection within {CHECK_TIMEOUT:?}",
                    self.host, self.port
                )),
            }
        })
    }
}
