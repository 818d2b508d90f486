//! Deterministic names and labels: how an instance's objects are found again on every retry.
//!
//! Every name and label value here is a pure function of the instance's resource id, tenant
//! and token, so a retry computes the same ones and server-side apply adopts what an earlier
//! attempt made. Values that are not valid as they are (a tenant with upper-case letters or
//! dots, a 64-character token) are sanitized and, when sanitizing changed them, suffixed with a
//! short hash of the original so that two different tenants never share a namespace.

use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The one field manager every write of this adapter uses.
pub const FIELD_MANAGER: &str = "setpoint";

/// Label: the instance's resource id (a UUID, hyphenated). Deletion selects by it.
pub const LABEL_INSTANCE: &str = "setpoint.dev/instance";
/// Label: the tenant (sanitized to a valid label value).
pub const LABEL_TENANT: &str = "setpoint.dev/tenant";
/// Label: the token of the unit that last wrote the object (sanitized to a valid label value).
pub const LABEL_TOKEN: &str = "setpoint.dev/token";
/// Label: who manages the object (`setpoint`).
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Label: the application (`kvx`).
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
/// Annotation: the tenant exactly as the engine knows it.
pub const ANNOTATION_TENANT: &str = "setpoint.dev/tenant";
/// Annotation: the token exactly as the engine knows it.
pub const ANNOTATION_TOKEN: &str = "setpoint.dev/token";
/// Annotation: the instance's user-facing name.
pub const ANNOTATION_NAME: &str = "setpoint.dev/instance-name";
/// Annotation: the instance's plan.
pub const ANNOTATION_PLAN: &str = "setpoint.dev/plan";
/// Annotation: the resource's spec generation the object was last written for (a decimal
/// number). An apply for an older generation refuses to write over it.
pub const ANNOTATION_GENERATION: &str = "setpoint.dev/generation";

/// Longest DNS-1123 label (namespace and service names).
const MAX_DNS_LABEL: usize = 63;
/// Longest label value.
const MAX_LABEL_VALUE: usize = 63;

/// The name of every object of an instance: `kvx-<resource id as 32 hex digits>` (36 chars).
///
/// Stable (depends on the resource id only), DNS-1123-label-safe, and unique per instance.
pub fn object_name(resource_id: Uuid) -> String {
    format!("kvx-{}", resource_id.simple())
}

/// The namespace of a tenant: `setpoint-<tenant>`, sanitized to a DNS-1123 label of at most
/// 63 characters; distinct tenants get distinct namespaces.
pub fn namespace_name(tenant: &str) -> String {
    let prefix = "setpoint-";
    let body = sanitize(
        tenant,
        MAX_DNS_LABEL - prefix.len(),
        |c| c.is_ascii_lowercase() || c.is_ascii_digit(),
        true,
    );
    format!("{prefix}{body}")
}

/// `value` as a valid label value: at most 63 characters of `[A-Za-z0-9._-]`, beginning and
/// ending with an alphanumeric. Valid values are kept verbatim; others are sanitized and
/// suffixed with a hash of the original.
pub fn label_value(value: &str) -> String {
    sanitize(
        value,
        MAX_LABEL_VALUE,
        |c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_'),
        false,
    )
}

/// True when `value` is a valid label value as Kubernetes defines it.
pub fn is_valid_label_value(value: &str) -> bool {
    value.is_empty()
        || (value.len() <= MAX_LABEL_VALUE
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && value.starts_with(|c: char| c.is_ascii_alphanumeric())
            && value.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

/// True when `name` is a DNS-1123 label: at most 63 lower-case alphanumerics or `-`, beginning
/// and ending with an alphanumeric.
pub fn is_dns1123_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_DNS_LABEL
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Keeps `value` if it is already valid; otherwise maps every disallowed character to `-`,
/// collapses runs, trims the ends, truncates and appends `-<8 hex of sha256(value)>`.
///
/// `keep` says which characters are allowed besides `-` (which is allowed inside); with
/// `lowercase`, upper-case letters are lowered first.
fn sanitize(value: &str, max: usize, keep: impl Fn(char) -> bool, lowercase: bool) -> String {
    let valid = !value.is_empty()
        && value.len() <= max
        && value.chars().all(|c| keep(c) || c == '-')
        && value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value.ends_with(|c: char| c.is_ascii_alphanumeric());
    if valid {
        return value.to_owned();
    }
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        let c = if lowercase { c.to_ascii_lowercase() } else { c };
        let c = if keep(c) { c } else { '-' };
        if c == '-' && out.ends_with('-') {
            continue;
        }
        out.push(c);
    }
    let hash = short_hash(value);
    // Room for "-" + 8 hex digits.
    let room = max - 9;
    let mut body: String = out.chars().take(room).collect();
    while body.ends_with(|c: char| !c.is_ascii_alphanumeric()) {
        body.pop();
    }
    let body = body.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
    if body.is_empty() {
        hash
    } else {
        format!("{body}-{hash}")
    }
}

/// The first 8 hex digits of the SHA-256 of `value`.
fn short_hash(value: &str) -> String {
    let digest = Sha256::digest(value.as_bytes());
    hex::encode(&digest[..4])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_are_stable_and_dns_safe() {
        let id = Uuid::parse_str("6f1c1f0e-8d0b-4b43-9a59-1c2b3d4e5f60").unwrap();
        assert_eq!(object_name(id), "kvx-6f1c1f0e8d0b4b439a591c2b3d4e5f60");
        assert_eq!(object_name(id), object_name(id));
        assert!(is_dns1123_label(&object_name(id)));
    }

    #[test]
    fn namespaces_keep_simple_tenants_and_separate_odd_ones() {
        assert_eq!(namespace_name("acme"), "setpoint-acme");
        let a = namespace_name("Acme");
        let b = namespace_name("acme.");
        assert!(a.starts_with("setpoint-acme-"), "{a}");
        assert_ne!(a, b);
        assert_ne!(a, namespace_name("acme"));
        for t in ["Acme", "a_b.c", "--x--", "é", &"x".repeat(200), "_"] {
            let ns = namespace_name(t);
            assert!(is_dns1123_label(&ns), "{t:?} -> {ns:?}");
        }
    }

    #[test]
    fn label_values_are_valid() {
        assert_eq!(label_value("acme"), "acme");
        assert_eq!(label_value("Acme.Corp_1"), "Acme.Corp_1");
        for v in ["-x", "x-", "a b", &"t".repeat(64), "_abc", "é", "."] {
            let l = label_value(v);
            assert!(is_valid_label_value(&l) && !l.is_empty(), "{v:?} -> {l:?}");
        }
        assert_ne!(label_value(&"t".repeat(64)), label_value(&"t".repeat(65)));
    }
}
