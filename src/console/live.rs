//! Live status for a page: server-sent events (`GET /events?names=a,b`) of the resources it
//! shows. The stream listens to the same LISTEN/NOTIFY feed as Watch
//! ([`crate::api::watch::InstanceEvents`]) and, for each change of a resource it follows,
//! reads the resource again through the API (GetResource, with the session's token), so a
//! tenant learns only what GetResource would tell it. Events:
//!
//! - `resource`: `{name, status, active, last_error, updated}`, first for each resource, then
//!   whenever one of these changes;
//! - `gone`: `{name}`, the resource was deleted (or is not the caller's);
//! - `signed-out`: the token stopped working; the page goes to the sign-in form.
//!
//! A stream subscribes before its first reads, so no change between the page and the stream
//! is missed; it ends when the browser goes, the token stops working, or the engine stops.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use uuid::Uuid;

use super::client::CallError;
use super::routes::{Console, User, call};
use super::views;
use crate::api::proto::{GetResourceRequest, Resource};

/// Most resources one stream follows (a page of the list shows 50).
const MAX_NAMES: usize = 100;
/// How often an idle stream checks that its token still works.
const RECHECK: Duration = Duration::from_secs(30);

/// `/events`' query.
#[derive(Debug, Deserialize)]
pub struct LiveQuery {
    /// Resource names, comma-separated.
    #[serde(default)]
    names: String,
}

/// What a page shows of a resource, as sent.
fn snapshot(r: &Resource) -> serde_json::Value {
    let status = views::status_name(r.status);
    json!({
        "name": r.name,
        "status": status,
        "active": r.has_active_work,
        "last_error": r.last_error,
        "updated": views::time(r.update_time.as_ref()),
    })
}

fn event(name: &str, data: &serde_json::Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

/// `GET /events`: see the module documentation.
pub async fn events(
    State(console): State<Console>,
    user: User,
    Query(q): Query<LiveQuery>,
) -> Response {
    let names: Vec<String> = q
        .names
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .take(MAX_NAMES)
        .map(str::to_owned)
        .collect();
    let changes = console.events().subscribe();
    let (tx, rx) = mpsc::channel::<Event>(64);
    tokio::spawn(follow(console, user, names, changes, tx));
    let stream = ReceiverStream::new(rx).map(Ok::<_, Infallible>);
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// What one resource's re-read means for the stream.
enum Read {
    Sent,
    Gone,
    SignedOut,
    Closed,
}

/// Reads `name` again and sends it if it changed since `last`.
async fn read(
    user: &User,
    name: &str,
    last: &mut HashMap<String, serde_json::Value>,
    uids: &mut HashMap<Uuid, String>,
    tx: &mpsc::Sender<Event>,
) -> Read {
    let got: Result<Resource, CallError> = call!(
        user,
        user_api(user),
        get_resource,
        GetResourceRequest {
            name: name.to_owned()
        }
    );
    match got {
        Ok(r) => {
            if let Ok(uid) = r.uid.parse::<Uuid>() {
                uids.insert(uid, name.to_owned());
            }
            let now = snapshot(&r);
            if last.get(name) != Some(&now) {
                last.insert(name.to_owned(), now.clone());
                if tx.send(event("resource", &now)).await.is_err() {
                    return Read::Closed;
                }
            }
            Read::Sent
        }
        Err(e) if e.code == Code::Unauthenticated => {
            user.end();
            let _ = tx.send(event("signed-out", &json!({}))).await;
            Read::SignedOut
        }
        Err(e)
            if matches!(
                e.code,
                Code::NotFound | Code::PermissionDenied | Code::InvalidArgument
            ) =>
        {
            let was_shown = last.remove(name).is_some() || !uids.values().any(|n| n == name);
            if was_shown
                && tx
                    .send(event("gone", &json!({ "name": name })))
                    .await
                    .is_err()
            {
                return Read::Closed;
            }
            uids.retain(|_, n| n != name);
            Read::Gone
        }
        // Busy or unavailable now: the next change reads it again.
        Err(_) => Read::Sent,
    }
}

fn user_api(user: &User) -> super::client::Resources {
    user.console_api().resources()
}

async fn follow(
    console: Console,
    user: User,
    names: Vec<String>,
    mut changes: broadcast::Receiver<Uuid>,
    tx: mpsc::Sender<Event>,
) {
    let mut last: HashMap<String, serde_json::Value> = HashMap::new();
    let mut uids: HashMap<Uuid, String> = HashMap::new();
    for name in &names {
        match read(&user, name, &mut last, &mut uids, &tx).await {
            Read::SignedOut | Read::Closed => return,
            Read::Sent | Read::Gone => {}
        }
    }
    let mut recheck = tokio::time::interval_at(tokio::time::Instant::now() + RECHECK, RECHECK);
    loop {
        let changed = tokio::select! {
            _ = tx.closed() => return,
            _ = console.shutdown().cancelled() => return,
            _ = recheck.tick() => {
                let header = format!("Bearer {}", user.token);
                if let Err(crate::api::ApiError::Unauthenticated(_)) =
                    console.auth().authenticate(Some(&header)).await
                {
                    user.end();
                    let _ = tx.send(event("signed-out", &json!({}))).await;
                    return;
                }
                continue;
            }
            n = changes.recv() => n,
        };
        let which: Vec<String> = match changed {
            Ok(uid) if uid.is_nil() => uids.values().cloned().collect(),
            Ok(uid) => match uids.get(&uid) {
                Some(name) => vec![name.clone()],
                None => continue,
            },
            // Missed notifications: read everything again.
            Err(broadcast::error::RecvError::Lagged(_)) => uids.values().cloned().collect(),
            Err(broadcast::error::RecvError::Closed) => return,
        };
        for name in which {
            match read(&user, &name, &mut last, &mut uids, &tx).await {
                Read::SignedOut | Read::Closed => return,
                Read::Sent | Read::Gone => {}
            }
        }
        if uids.is_empty() {
            // Everything it followed is gone.
            return;
        }
    }
}
