//! When the API's server certificate expires, read from its PEM, for the start-up log and the
//! `setpoint_api_tls_certificate_expiry_seconds` gauge, so that an alert fires before clients
//! start failing their handshakes.
//!
//! Only the validity's end is read: the certificate is trusted by nobody here (rustls parses
//! and uses it), so a small DER walk to one field is enough and adds no X.509 dependency.

use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio_util::sync::CancellationToken;

/// How often the gauge is brought up to date.
const REFRESH: Duration = Duration::from_secs(60);
/// Below this the start-up log warns.
const WARN_BEFORE: chrono::Duration = chrono::Duration::days(14);

/// Logs when the certificate expires (a warning within 14 days, an error once it has) and keeps
/// the expiry gauge current until `shutdown`.
pub fn watch(not_after: DateTime<Utc>, shutdown: CancellationToken) {
    let left = not_after - Utc::now();
    if left <= chrono::Duration::zero() {
        tracing::error!(%not_after,
            "the API's TLS certificate has expired: clients will refuse it; renew it and restart");
    } else if left < WARN_BEFORE {
        tracing::warn!(%not_after, days_left = left.num_days(),
            "the API's TLS certificate expires soon: renew it and restart");
    }
    tokio::spawn(async move {
        loop {
            let secs = (not_after - Utc::now()).num_milliseconds() as f64 / 1000.0;
            crate::metrics::api_tls_certificate_expiry(secs);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(REFRESH) => {}
            }
        }
    });
}

/// The `notAfter` time of the first certificate in `pem` (the server's own, which comes first
/// in a chain); `None` when there is no certificate or it cannot be read.
pub fn not_after(pem: &[u8]) -> Option<DateTime<Utc>> {
    let first = CertificateDer::pem_slice_iter(pem).next()?.ok()?;
    der_not_after(&first)
}

/// One DER element of `input`: its tag, its contents and what follows it.
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const VERSION: u8 = 0xa0;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// `notAfter` of a DER certificate (RFC 5280 §4.1: Certificate → tbsCertificate → version?,
/// serialNumber, signature, issuer, validity → notBefore, notAfter).
fn der_not_after(der: &[u8]) -> Option<DateTime<Utc>> {
    let (SEQUENCE, certificate, _) = element(der)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = element(certificate)? else {
        return None;
    };
    let (mut tag, _, mut rest) = element(tbs)?;
    if tag == VERSION {
        (tag, _, rest) = element(rest)?;
    }
    if tag != INTEGER {
        return None;
    }
    let (SEQUENCE, _signature, rest) = element(rest)? else {
        return None;
    };
    let (SEQUENCE, _issuer, rest) = element(rest)? else {
        return None;
    };
    let (SEQUENCE, validity, _) = element(rest)? else {
        return None;
    };
    let (_, _not_before, rest) = element(validity)?;
    let (tag, time, _) = element(rest)?;
    parse_time(tag, time)
}

/// An X.509 time: UTCTime `YYMMDDHHMMSSZ` (years 50–99 are 19xx, RFC 5280 §4.1.2.5.1) or
/// GeneralizedTime `YYYYMMDDHHMMSSZ`.
fn parse_time(tag: u8, bytes: &[u8]) -> Option<DateTime<Utc>> {
    let text = std::str::from_utf8(bytes).ok()?;
    let digits = text.strip_suffix('Z')?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let num = |s: &str| s.parse::<u32>().ok();
    let (year, rest) = match (tag, digits.len()) {
        (UTC_TIME, 12) => {
            let yy = i32::try_from(num(&digits[..2])?).ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &digits[2..])
        }
        (GENERALIZED_TIME, 14) => (i32::try_from(num(&digits[..4])?).ok()?, &digits[4..]),
        _ => return None,
    };
    let date = NaiveDate::from_ymd_opt(year, num(&rest[..2])?, num(&rest[2..4])?)?;
    let time = date.and_hms_opt(num(&rest[4..6])?, num(&rest[6..8])?, num(&rest[8..10])?)?;
    Some(time.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_and_generalized_times() {
        let t = |tag, s: &str| parse_time(tag, s.as_bytes()).map(|d| d.to_rfc3339());
        assert_eq!(
            t(UTC_TIME, "261129103000Z").as_deref(),
            Some("2026-11-29T10:30:00+00:00")
        );
        assert_eq!(
            t(UTC_TIME, "991231235959Z").as_deref(),
            Some("1999-12-31T23:59:59+00:00")
        );
        assert_eq!(
            t(GENERALIZED_TIME, "20500101000000Z").as_deref(),
            Some("2050-01-01T00:00:00+00:00")
        );
        assert_eq!(t(UTC_TIME, "2611291030Z"), None);
        assert_eq!(t(UTC_TIME, "26113x103000Z"), None);
        assert_eq!(t(GENERALIZED_TIME, "261129103000Z"), None);
    }

    #[test]
    fn not_pem_or_not_a_certificate_is_none() {
        assert_eq!(not_after(b"hello"), None);
        assert_eq!(
            not_after(b"-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n"),
            None
        );
        assert_eq!(element(&[0x30, 0x85, 1, 2, 3, 4, 5]), None);
        assert_eq!(element(&[0x30, 0x05, 1]), None);
    }
}
