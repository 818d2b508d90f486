//! Record types and their values: checking a spec's values, their canonical form, and the
//! form Route 53 stores.
//!
//! Every value has one *canonical* form, which is what a spec's value is normalised to and
//! what an observation reports, so that desired and observed values compare as strings:
//! addresses as Rust prints them (`2001:db8::1`), host names absolute and lowercase, MX as
//! `PRIORITY HOST`, TXT as the plain text. Only TXT differs on the wire (quoted strings, see
//! the `txt` module).

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{name, txt};

/// Longest value Route 53 accepts in one resource record (its `Value` field).
pub const MAX_VALUE_LEN: usize = 4000;

/// The record types this adapter manages. The apex SOA and NS records belong to Route 53 and
/// are never touched; other types are refused by the spec check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum RecordType {
    /// An IPv4 address.
    A,
    /// An IPv6 address.
    Aaaa,
    /// An alias to another name; alone at its name, never at the apex, exactly one value.
    Cname,
    /// Free text (SPF, DKIM, verification tokens), printable ASCII.
    Txt,
    /// A mail exchange: `PRIORITY HOST`, e.g. `10 mail.example.com.`.
    Mx,
}

/// Every [`RecordType`], in the order error messages list them.
pub const SUPPORTED_TYPES: [RecordType; 5] = [
    RecordType::A,
    RecordType::Aaaa,
    RecordType::Cname,
    RecordType::Txt,
    RecordType::Mx,
];

impl RecordType {
    /// The type as Route 53 and DNS write it: `A`, `AAAA`, `CNAME`, `TXT`, `MX`.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordType::A => "A",
            RecordType::Aaaa => "AAAA",
            RecordType::Cname => "CNAME",
            RecordType::Txt => "TXT",
            RecordType::Mx => "MX",
        }
    }

    /// The value checked and put in canonical form; the error completes "the value …".
    pub(crate) fn canonical(self, raw: &str) -> Result<String, String> {
        let v = raw.trim();
        match self {
            RecordType::A => Ipv4Addr::from_str(v)
                .map(|a| a.to_string())
                .map_err(|_| format!("{raw:?} is not an IPv4 address (e.g. 192.0.2.10)")),
            RecordType::Aaaa => Ipv6Addr::from_str(v)
                .map(|a| a.to_string())
                .map_err(|_| format!("{raw:?} is not an IPv6 address (e.g. 2001:db8::10)")),
            RecordType::Cname => name::host_name(v).map_err(|p| format!("is not a host name: {p}")),
            RecordType::Mx => {
                let mut parts = v.split_ascii_whitespace();
                let (Some(priority), Some(host), None) = (parts.next(), parts.next(), parts.next())
                else {
                    return Err(format!(
                        "{raw:?} is not \"PRIORITY HOST\" (e.g. \"10 mail.example.com\")"
                    ));
                };
                let priority = priority.parse::<u16>().map_err(|_| {
                    format!("{raw:?} has the priority {priority:?}; it must be 0 to 65535")
                })?;
                let host =
                    name::host_name(host).map_err(|p| format!("has a bad mail host: {p}"))?;
                Ok(format!("{priority} {host}"))
            }
            RecordType::Txt => {
                // Not trimmed: spaces can matter in TXT.
                if let Some(c) = raw.chars().find(|c| !(' '..='~').contains(c)) {
                    return Err(format!(
                        "holds {c:?}; TXT values here are printable ASCII (no tabs, newlines or \
                         non-ASCII characters)"
                    ));
                }
                let wire = txt::render(raw);
                if wire.len() > MAX_VALUE_LEN {
                    return Err(format!(
                        "is {} characters long once quoted for Route 53 (at most \
                         {MAX_VALUE_LEN})",
                        wire.len()
                    ));
                }
                Ok(raw.to_owned())
            }
        }
    }

    /// A canonical value in the form Route 53 stores.
    pub(crate) fn write_wire(self, canonical: &str) -> String {
        match self {
            RecordType::Txt => txt::render(canonical),
            _ => canonical.to_owned(),
        }
    }

    /// A value read from Route 53 in canonical form (as is, lowercased for names, when it is
    /// not valid: someone else may have written it).
    pub(crate) fn read_wire(self, wire: &str) -> String {
        match self {
            RecordType::Txt => txt::parse(wire),
            _ => self
                .canonical(wire)
                .unwrap_or_else(|_| wire.trim().to_owned()),
        }
    }
}

impl fmt::Display for RecordType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A record type this adapter does not manage.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a record type setpoint manages; use one of A, AAAA, CNAME, TXT, MX (the \
     zone's own SOA and NS records belong to Route 53)"
)]
pub struct UnsupportedType(pub String);

impl FromStr for RecordType {
    type Err = UnsupportedType;

    /// Case-insensitive: `"aaaa"` is [`RecordType::Aaaa`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SUPPORTED_TYPES
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| UnsupportedType(s.to_owned()))
    }
}

impl TryFrom<String> for RecordType {
    type Error = UnsupportedType;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<RecordType> for String {
    fn from(t: RecordType) -> Self {
        t.as_str().to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_parse_case_insensitively_and_refuse_the_rest() {
        assert_eq!("aaaa".parse::<RecordType>().unwrap(), RecordType::Aaaa);
        assert_eq!("MX".parse::<RecordType>().unwrap(), RecordType::Mx);
        let err = "NS".parse::<RecordType>().unwrap_err().to_string();
        assert!(err.contains("A, AAAA, CNAME, TXT, MX"), "{err}");
        let err = serde_json::from_str::<RecordType>("\"SRV\"").unwrap_err();
        assert!(err.to_string().contains("SRV"), "{err}");
        assert_eq!(
            serde_json::to_string(&RecordType::Cname).unwrap(),
            "\"CNAME\""
        );
    }

    #[test]
    fn values_are_checked_per_type_and_made_canonical() {
        use RecordType::*;
        assert_eq!(A.canonical(" 192.0.2.1 ").unwrap(), "192.0.2.1");
        assert!(A.canonical("192.0.2.256").unwrap_err().contains("IPv4"));
        assert!(A.canonical("2001:db8::1").is_err());
        assert_eq!(
            Aaaa.canonical("2001:DB8:0:0:0:0:0:1").unwrap(),
            "2001:db8::1"
        );
        assert!(Aaaa.canonical("192.0.2.1").unwrap_err().contains("IPv6"));
        assert_eq!(
            Cname.canonical("Target.Example.NET").unwrap(),
            "target.example.net."
        );
        assert!(Cname.canonical("not a host").is_err());
        assert_eq!(
            Mx.canonical("10   mail.example.com").unwrap(),
            "10 mail.example.com."
        );
        assert!(
            Mx.canonical("mail.example.com")
                .unwrap_err()
                .contains("PRIORITY")
        );
        assert!(
            Mx.canonical("70000 mx.example.com")
                .unwrap_err()
                .contains("65535")
        );
        assert_eq!(Txt.canonical(" v=spf1 -all").unwrap(), " v=spf1 -all");
        assert!(
            Txt.canonical("tab\there")
                .unwrap_err()
                .contains("printable")
        );
        assert!(
            Txt.canonical(&"x".repeat(4000))
                .unwrap_err()
                .contains("4000")
        );
    }

    #[test]
    fn wire_forms_round_trip() {
        use RecordType::*;
        for (t, v) in [
            (A, "192.0.2.1"),
            (Aaaa, "2001:db8::1"),
            (Cname, "x.example.net."),
            (Mx, "10 mx.example.com."),
            (Txt, "say \"hi\""),
        ] {
            assert_eq!(t.read_wire(&t.write_wire(v)), v);
        }
        assert_eq!(Txt.write_wire("a"), "\"a\"");
        assert_eq!(Mx.read_wire("10 MX.example.com"), "10 mx.example.com.");
        assert_eq!(A.read_wire("garbage"), "garbage");
    }
}
