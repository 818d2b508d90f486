//! Ownership records: how setpoint marks a record set as its own, since Route 53 record sets
//! cannot be tagged.
//!
//! As external-dns does with its TXT registry, every record set setpoint writes has a TXT
//! *ownership record* beside it, written in the same change batch (Route 53 applies a batch
//! atomically):
//!
//! ```text
//! www.example.com.               A    192.0.2.10
//! _setpoint-a.www.example.com.   TXT  "setpoint:resource=4f9c…"
//! api.example.com.               CNAME lb-1.example.net.   (set "blue", weight 90)
//! _setpoint-cname-blue.api.example.com.  TXT "setpoint:resource=4f9c…"
//! ```
//!
//! The ownership record's name is the record's name with one label in front:
//! [`PREFIX`], the type in lowercase and, for a weighted set, `-` and its set identifier. A
//! separate name (rather than a TXT at the record's own name) is needed because a CNAME must be
//! alone at its name, and it lets A and TXT records at one name have separate owners. A record
//! set is *ours* only if its ownership record names our resource; a retry after a crash
//! therefore recognises what its earlier attempt wrote, and a record nobody marked is someone
//! else's.

use uuid::Uuid;

use crate::spec::RecordKey;
use crate::txt;
use crate::value::RecordType;

/// The first characters of every ownership record's first label. Spec record names may not
/// start with it.
pub const PREFIX: &str = "_setpoint-";

/// The TTL of ownership records (nobody resolves them but people debugging).
pub const OWNERSHIP_TTL: u32 = 300;

/// What an ownership record's text starts with; the resource id follows.
pub const VALUE_PREFIX: &str = "setpoint:resource=";

/// The name of the ownership record of `key`.
pub fn owner_name(key: &RecordKey) -> String {
    let mut label = format!("{PREFIX}{}", key.record_type.as_str().to_ascii_lowercase());
    if let Some(id) = &key.set_identifier {
        label.push('-');
        label.push_str(id);
    }
    format!("{label}.{}", key.name)
}

/// True if `name`'s first label is in the ownership records' namespace.
pub(crate) fn is_reserved(name: &str) -> bool {
    name.starts_with(PREFIX)
}

/// The record an ownership record named `name` (absolute, lowercase) stands for, if `name` is
/// one.
pub(crate) fn owned_key(name: &str) -> Option<RecordKey> {
    let (label, rest) = name.split_once('.')?;
    let tail = label.strip_prefix(PREFIX)?;
    let (type_part, set_identifier) = match tail.split_once('-') {
        Some((t, id)) if !id.is_empty() => (t, Some(id.to_owned())),
        Some(_) => return None,
        None => (tail, None),
    };
    if rest.is_empty() || !type_part.bytes().all(|b| b.is_ascii_lowercase()) {
        return None;
    }
    let record_type = type_part.parse::<RecordType>().ok()?;
    Some(RecordKey {
        name: rest.to_owned(),
        record_type,
        set_identifier,
    })
}

/// The TXT value (Route 53's quoted form) marking a record as `resource`'s.
pub(crate) fn owner_value(resource: Uuid) -> String {
    txt::render(&format!("{VALUE_PREFIX}{resource}"))
}

/// Who an ownership record's values (Route 53's form) name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    /// A setpoint resource.
    Resource(Uuid),
    /// A TXT record at an ownership name that names no resource (written by hand?).
    Unreadable,
}

impl Owner {
    /// Reads the first `setpoint:resource=<uuid>` string among `values`.
    pub(crate) fn read(values: &[String]) -> Owner {
        values
            .iter()
            .flat_map(|v| txt::strings(v))
            .find_map(|s| {
                s.strip_prefix(VALUE_PREFIX)
                    .and_then(|id| Uuid::parse_str(id.trim()).ok())
            })
            .map_or(Owner::Unreadable, Owner::Resource)
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Resource(id) => write!(f, "setpoint resource {id}"),
            Owner::Unreadable => f.write_str("an ownership record that names no resource"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str, t: RecordType, set: Option<&str>) -> RecordKey {
        RecordKey {
            name: name.into(),
            record_type: t,
            set_identifier: set.map(str::to_owned),
        }
    }

    #[test]
    fn names_round_trip() {
        for k in [
            key("www.example.com.", RecordType::A, None),
            key("example.com.", RecordType::Mx, None),
            key("*.apps.example.com.", RecordType::Aaaa, None),
            key("api.example.com.", RecordType::Cname, Some("blue-2")),
        ] {
            let owner = owner_name(&k);
            assert!(is_reserved(&owner));
            assert_eq!(owned_key(&owner), Some(k));
        }
        assert_eq!(
            owner_name(&key("api.example.com.", RecordType::Cname, Some("blue"))),
            "_setpoint-cname-blue.api.example.com."
        );
        assert_eq!(owned_key("www.example.com."), None);
        assert_eq!(owned_key("_setpoint-ns.example.com."), None);
        assert_eq!(owned_key("_setpoint-a-.example.com."), None);
        assert_eq!(owned_key("_setpoint-a"), None);
    }

    #[test]
    fn values_name_the_owner() {
        let id = Uuid::new_v4();
        assert_eq!(Owner::read(&[owner_value(id)]), Owner::Resource(id));
        assert_eq!(
            Owner::read(&["\"other\"".into(), format!("\"{VALUE_PREFIX}{id}\" \"x\"")]),
            Owner::Resource(id)
        );
        assert_eq!(Owner::read(&["\"hello\"".into()]), Owner::Unreadable);
        assert_eq!(Owner::read(&[]), Owner::Unreadable);
    }
}
