//! The Kubernetes API test server ([`TestApiServer`]) as a process of its own, for scripts that
//! run several engines against one cluster (`scripts/upgrade-check.sh round`):
//!
//! ```sh
//! cargo run -p setpoint-kubernetes --example test-server -- 127.0.0.1:0
//! ```
//!
//! Prints its URL on the first line of standard output, then serves until SIGTERM or Ctrl-C.

use setpoint_kubernetes::TestApiServer;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".to_owned())
        .parse()?;
    let server = TestApiServer::start_on(addr).await?;
    println!("{}", server.url());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    drop(server);
    Ok(())
}
