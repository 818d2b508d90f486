//! Live progress of a change: the lines `--wait` and `watch` print while a resource (a KVX
//! instance or a resource of any kind) moves towards its desired state.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use tonic::Code;
use tonic::codec::Streaming;

use super::ClientError;

/// What the progress lines need of a watched object; both `Instance` and `Resource` have it.
pub(crate) trait Watched {
    /// Its full name.
    fn name(&self) -> &str;
    /// Its status as printed (`READY`, `FAILED`, …).
    fn status_text(&self) -> &'static str;
    /// Generations: (observed, desired).
    fn generations(&self) -> (i64, i64);
    /// The unit of work running for it, if any.
    fn active_work(&self) -> Option<i64>;
    /// The last error recorded for it; empty if none.
    fn last_error(&self) -> &str;
    /// True once it reached READY, FAILED or DELETED with no work running.
    fn is_done(&self) -> bool;
    /// True if it ended FAILED.
    fn is_failed(&self) -> bool;
    /// Its `--json` form.
    fn json(&self) -> serde_json::Value;
    /// Its text form (what `get` prints).
    fn text(&self) -> String;
}

/// Prints `w` as `get` does: JSON with `json`, else the text form.
pub(crate) fn print<W: Watched>(w: &W, json: bool) {
    if json {
        println!("{}", w.json());
    } else {
        print!("{}", w.text());
    }
}

/// Reads `stream` until the object is done (or deleted, or for ever without `until_done`),
/// printing a line per change; on a terminal a spinner line shows the time spent. Returns the
/// last state seen.
///
/// # Errors
/// The stream's error, as the server sent it.
pub(crate) async fn follow<W: Watched>(
    mut stream: Streaming<W>,
    until_done: bool,
    json: bool,
) -> Result<Option<W>, ClientError> {
    let live = !json && std::io::stderr().is_terminal();
    let start = Instant::now();
    let mut last: Option<W> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(120));
    let spinner = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
    let mut frame = 0usize;
    loop {
        let msg = tokio::select! {
            m = stream.message() => m?,
            _ = tick.tick() => {
                if live && let Some(w) = &last {
                    frame += 1;
                    eprint!("\r{} {} {}  {:.1}s   ", spinner[frame % spinner.len()], w.name(),
                            w.status_text(), start.elapsed().as_secs_f64());
                    let _ = std::io::stderr().flush();
                }
                continue;
            }
        };
        let Some(w) = msg else { break };
        if live {
            eprint!("\r\x1b[2K");
        }
        if json {
            println!("{}", w.json());
        } else {
            println!("{}", line(&w, start.elapsed()));
        }
        let done = w.is_done();
        last = Some(w);
        if until_done && done {
            break;
        }
    }
    if live {
        eprint!("\r\x1b[2K");
    }
    Ok(last)
}

/// Ends a create, update or delete: prints the answer, or with `wait` follows the object
/// until done (`watch` opens the stream when called).
///
/// # Errors
/// The watch's errors, and [`ClientError::Failed`] if the object ended FAILED. An object
/// deleted and gone before the watch started is success.
pub(crate) async fn finish_change<W, F>(
    answer: W,
    wait: bool,
    json: bool,
    watch: F,
) -> Result<(), ClientError>
where
    W: Watched,
    F: std::future::Future<Output = Result<Streaming<W>, ClientError>>,
{
    if !wait {
        print(&answer, json);
        return Ok(());
    }
    let last = match watch.await {
        Ok(stream) => follow(stream, true, json).await,
        Err(e) => Err(e),
    };
    let last = match last {
        Ok(l) => l,
        // Deleted and gone before the watch started.
        Err(ClientError::Call(s)) if s.code() == Code::NotFound => None,
        Err(e) => return Err(e),
    };
    match last {
        Some(w) if w.is_failed() => Err(ClientError::Failed(
            w.name().to_owned(),
            w.last_error().to_owned(),
        )),
        _ => Ok(()),
    }
}

/// One progress line: time, name, status, generations, running work, error.
fn line<W: Watched>(w: &W, elapsed: Duration) -> String {
    let (observed, desired) = w.generations();
    format!(
        "{:>7.1}s  {}  {}  generation {}/{}{}{}",
        elapsed.as_secs_f64(),
        w.name(),
        w.status_text(),
        observed,
        desired,
        w.active_work()
            .map(|id| format!("  work {id} running"))
            .unwrap_or_default(),
        if w.last_error().is_empty() {
            String::new()
        } else {
            format!("  error: {}", w.last_error())
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::proto::{Instance, InstanceStatus};

    #[test]
    fn a_line_names_status_generations_work_and_error() {
        let i = Instance {
            name: "tenants/acme/instances/db-1".into(),
            status: InstanceStatus::Updating as i32,
            generation: 3,
            observed_generation: 2,
            has_active_work: true,
            active_work_id: 41,
            last_error: "throttled".into(),
            ..Default::default()
        };
        assert_eq!(
            line(&i, Duration::from_millis(1500)),
            "    1.5s  tenants/acme/instances/db-1  UPDATING  generation 2/3  work 41 running  \
             error: throttled"
        );
    }
}
