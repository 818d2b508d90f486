//! The `webhook.notify` handler: one signed JSON POST per unit of work, at least once, and not
//! again once the endpoint accepted it.
//!
//! A unit's spec is `{"event": "instance.ready", "data": {…}}`. The body sent is
//!
//! ```json
//! {"id": "<Idempotency-Key>", "event": "instance.ready", "tenant": "acme",
//!  "resource_id": "…", "work_id": 42, "data": {…}}
//! ```
//!
//! built only from the unit, so every attempt of a unit sends the same bytes with the same
//! signature and the same `Idempotency-Key` (see [`crate::signing`]).
//!
//! How an attempt goes, and why:
//! 1. **Find before make.** If `webhook_deliveries` holds an accepted POST for the unit's token
//!    (an earlier attempt was accepted, then its completion was lost), the unit is done: nothing
//!    is sent again.
//! 2. **Fence, then act.** The attempt checks that it still holds the unit immediately before
//!    the POST and drops the POST if it loses the unit while waiting for the answer, so a
//!    stale attempt stops acting before another one redoes the unit.
//! 3. **Record the answer** (every answered POST, accepted or not), then classify it:
//!    2xx is done; 408, 429 and 5xx, timeouts and connection failures are transient (retried
//!    with backoff, honouring `Retry-After`); any other 4xx is permanent (the unit is parked
//!    for an operator with the endpoint's answer); a redirect is permanent too (configure the
//!    final URL). A POST whose answer is lost is retried with the same key: the endpoint
//!    recognises it.

use std::time::Duration;

use reqwest::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use setpoint_adapter::{AdapterError, Outcome, TypedHandler, WorkContext};
use sqlx::PgPool;

use crate::deliveries::{self, NewDelivery};
use crate::signing::{IDEMPOTENCY_HEADER, SIGNATURE_HEADER, Secret, idempotency_key, sign};

/// The work kind.
pub const KIND: &str = "webhook.notify";
/// Longest event name.
pub const MAX_EVENT_LEN: usize = 200;
/// How much of an endpoint's refusal is quoted in the unit's error.
const QUOTED_BODY: usize = 300;

/// A unit's spec.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifySpec {
    /// What happened (`instance.ready`): 1 to [`MAX_EVENT_LEN`] characters.
    pub event: String,
    /// The event's details, sent as they are.
    #[serde(default)]
    pub data: Value,
}

/// The JSON body POSTed.
#[derive(Debug, Serialize)]
struct Payload<'a> {
    id: &'a str,
    event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resource_id: Option<uuid::Uuid>,
    work_id: i64,
    data: &'a Value,
}

/// Runs `webhook.notify` units.
#[derive(Debug, Clone)]
pub struct Notify {
    client: reqwest::Client,
    url: Url,
    timeout: Duration,
    retention: Duration,
    secret: Secret,
    pool: PgPool,
}

impl Notify {
    /// A handler POSTing to `url` with `client` (whose timeout is `timeout`), signing with
    /// `secret`, recording answers in `pool` and keeping them for `retention`.
    pub fn new(
        client: reqwest::Client,
        settings: &crate::config::WebhookSettings,
        pool: PgPool,
    ) -> Self {
        Self {
            client,
            url: settings.url.clone(),
            timeout: settings.timeout,
            retention: settings.retention,
            secret: settings.secret.clone(),
            pool,
        }
    }

    /// What a failed send means. The message names the endpoint and the cause, never the
    /// secret (which is in no request part that an error can show).
    fn send_error(&self, e: &reqwest::Error) -> AdapterError {
        let mut cause = String::new();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            cause = s.to_string();
            source = s.source();
        }
        let host = self.url.host_str().unwrap_or_default();
        if e.is_timeout() {
            AdapterError::transient(format!(
                "the webhook endpoint {host} did not answer within {:?}; retrying with the same \
                 Idempotency-Key",
                self.timeout
            ))
            .with_code("timeout")
        } else if e.is_connect() {
            AdapterError::transient(format!(
                "cannot connect to the webhook endpoint {host}: {cause}"
            ))
            .with_code("connect")
        } else if e.is_builder() {
            AdapterError::permanent(format!("cannot build the request to {host}: {e}"))
                .with_code("request")
        } else {
            AdapterError::transient(format!(
                "the POST to the webhook endpoint {host} failed: {e}{}",
                if cause.is_empty() {
                    String::new()
                } else {
                    format!(" ({cause})")
                }
            ))
            .with_code("send")
        }
    }
}

/// What an answer means: `Ok` for 2xx, otherwise the error of its class.
pub fn classify(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &str,
) -> Result<(), AdapterError> {
    let code = format!("http-{}", status.as_u16());
    let quoted = if body.trim().is_empty() {
        String::new()
    } else {
        let clipped: String = body.trim().chars().take(QUOTED_BODY).collect();
        format!(": {clipped}")
    };
    let with_hint = |e: AdapterError| match retry_after {
        Some(d) => e.with_retry_after(d),
        None => e,
    };
    if status.is_success() {
        Ok(())
    } else if status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
    {
        Err(with_hint(
            AdapterError::transient(format!(
                "the webhook endpoint answered {status}{quoted}; retrying with the same \
                 Idempotency-Key"
            ))
            .with_code(code),
        ))
    } else if status.is_client_error() {
        Err(AdapterError::permanent(format!(
            "the webhook endpoint refused the notification with {status}{quoted}; retrying \
             the same request cannot succeed: fix the endpoint (or the unit's event), then \
             retry the unit (`setpoint work retry`) or cancel it"
        ))
        .with_code(code))
    } else {
        Err(AdapterError::permanent(format!(
            "the webhook endpoint answered {status} (not a success); set [plugins.webhook] url to \
             the address that accepts the POST itself"
        ))
        .with_code(code))
    }
}

/// `Retry-After` in seconds (the HTTP-date form is ignored: the engine's backoff applies).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(|s| Duration::from_secs(s.min(3600)))
}

/// The first bytes of an answer's body, as text: enough to quote, however much the endpoint
/// sends (the rest is never read).
async fn head_of(mut response: reqwest::Response) -> String {
    const MAX: usize = 4 * QUOTED_BODY;
    let mut head = Vec::new();
    while head.len() < MAX {
        match response.chunk().await {
            Ok(Some(chunk)) => head.extend_from_slice(&chunk),
            _ => break,
        }
    }
    head.truncate(MAX);
    String::from_utf8_lossy(&head).into_owned()
}

fn database(e: setpoint::store::StoreError) -> AdapterError {
    AdapterError::transient(format!("webhook_deliveries: {e}")).with_code("database")
}

impl TypedHandler for Notify {
    type Spec = NotifySpec;
    const KIND: &'static str = KIND;

    async fn run(&self, ctx: &WorkContext, spec: NotifySpec) -> Result<Outcome, AdapterError> {
        if spec.event.is_empty() || spec.event.chars().count() > MAX_EVENT_LEN {
            return Err(AdapterError::permanent(format!(
                "the event of a {KIND} unit must have 1 to {MAX_EVENT_LEN} characters"
            ))
            .with_code("invalid-spec"));
        }
        let key = idempotency_key(&ctx.token);
        let token = ctx.token.as_str();

        // 1. Find before make.
        if let Some(at) = deliveries::accepted(&self.pool, token)
            .await
            .map_err(database)?
        {
            tracing::info!(work_id = ctx.work_id, %key, delivered_at = %at,
                "the endpoint accepted this notification on an earlier attempt; not sending it again");
            return Ok(Outcome::done());
        }

        let body = serde_json::to_vec(&Payload {
            id: key.as_str(),
            event: &spec.event,
            tenant: ctx.tenant.as_deref(),
            resource_id: ctx.resource_id,
            work_id: ctx.work_id,
            data: &spec.data,
        })
        .map_err(|e| AdapterError::permanent(format!("cannot encode the notification: {e}")))?;
        let signature = sign(&self.secret, &body);
        let request = self
            .client
            .post(self.url.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(IDEMPOTENCY_HEADER, key.as_str())
            .header(SIGNATURE_HEADER, signature)
            .body(body);

        // 2. Fence, then act: `guard` checks the fence first and drops the POST if the
        // attempt loses its unit before the answer comes.
        ctx.record_call(format!("webhook:POST {} Idempotency-Key={key}", self.url));
        let response = ctx
            .fence
            .guard(async { request.send().await.map_err(|e| self.send_error(&e)) })
            .await?;
        let status = response.status();
        let wait = retry_after(response.headers());
        // A refusal's body says why; a success's is not needed.
        let text = if status.is_success() {
            String::new()
        } else {
            head_of(response).await
        };

        // 3. Record the answer, then classify it.
        deliveries::record(
            &self.pool,
            &NewDelivery {
                work_id: ctx.work_id,
                token,
                idempotency_key: key.as_str(),
                tenant: ctx.tenant.as_deref(),
                event: &spec.event,
                attempt: ctx.attempt,
                status_code: status.as_u16(),
            },
        )
        .await
        .map_err(database)?;
        match deliveries::prune(&self.pool, self.retention).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(rows = n, "old webhook deliveries deleted"),
            // Retention catches up with the next delivery; this one is not failed for it.
            Err(e) => tracing::warn!(error = %e, "old webhook deliveries could not be deleted"),
        }
        classify(status, wait, &text)?;
        tracing::info!(work_id = ctx.work_id, %key, status = status.as_u16(), event = %spec.event,
            "webhook notification delivered");
        Ok(Outcome::done())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_classified_by_status() {
        assert!(classify(StatusCode::OK, None, "").is_ok());
        assert!(classify(StatusCode::ACCEPTED, None, "").is_ok());
        for transient in [408, 429, 500, 502, 503, 504] {
            let s = StatusCode::from_u16(transient).expect("status");
            let e = classify(s, Some(Duration::from_secs(7)), "busy").expect_err("fails");
            assert!(e.is_transient(), "{transient}");
            assert_eq!(e.retry_after, Some(Duration::from_secs(7)));
            assert_eq!(
                e.code.as_deref(),
                Some(format!("http-{transient}").as_str())
            );
        }
        for permanent in [400, 401, 403, 404, 410, 422, 301, 302] {
            let s = StatusCode::from_u16(permanent).expect("status");
            let e = classify(s, None, "no such hook").expect_err("fails");
            assert!(!e.is_transient(), "{permanent}");
        }
        let e = classify(StatusCode::BAD_REQUEST, None, &"x".repeat(5000)).expect_err("fails");
        assert!(
            e.message.contains("400 Bad Request") && e.message.len() < 1000,
            "{e}"
        );
    }
}
