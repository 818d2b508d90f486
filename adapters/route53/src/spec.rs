//! What a `dns.zone` asks for ([`ZoneSpec`], [`RecordSpec`]), who asks ([`ZoneRequest`]), and
//! the check that turns a spec into the normalised form the adapter works with.
//!
//! The check runs before any call to AWS and reports every problem at once, each naming its
//! field (`records[2].values[0]`), so a person can fix a spec in one go and the engine can map
//! them to field violations.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use setpoint_adapter::IdempotencyToken;
use uuid::Uuid;

use crate::name;
use crate::ownership;
use crate::value::RecordType;

/// TTL of a record whose spec gives none, in seconds.
pub const DEFAULT_TTL: u32 = 300;
/// Shortest TTL accepted. Route 53 takes 0, but a TTL of 0 turns off caching, multiplies the
/// queries (Route 53 bills per query) and is nearly always a mistake.
pub const MIN_TTL: u32 = 1;
/// Longest TTL accepted (one week): a wrong value must not stick in resolvers' caches for
/// longer than that.
pub const MAX_TTL: u32 = 604_800;
/// Most records (sets) one zone spec may hold.
pub const MAX_RECORDS: usize = 500;
/// Most values one record may hold.
pub const MAX_VALUES: usize = 100;
/// Most characters one record's values may hold in Route 53's form. Route 53 takes 32,000 per
/// request and counts an `UPSERT` twice, so one record must stay below half of that.
pub const MAX_RECORD_CHARS: usize = 15_000;
/// Longest zone comment (Route 53's limit).
pub const MAX_COMMENT_LEN: usize = 256;
/// Longest set identifier. Set identifiers are part of the ownership record's name (one DNS
/// label), hence the limit and the character set (lowercase letters, digits, `-`).
pub const MAX_SET_IDENTIFIER_LEN: usize = 40;

/// The desired state of a `dns.zone`: a public hosted zone and the records setpoint keeps in
/// it.
///
/// ```json
/// {
///   "name": "example.com",
///   "comment": "team payments",
///   "records": [
///     { "name": "www", "type": "A", "ttl": 300, "values": ["192.0.2.10", "192.0.2.11"] },
///     { "name": "@", "type": "MX", "values": ["10 mail.example.com"] },
///     { "name": "@", "type": "TXT", "values": ["v=spf1 include:_spf.example.net -all"] },
///     { "name": "api", "type": "CNAME", "values": ["lb-1.example.net"],
///       "set_identifier": "blue", "weight": 90 }
///   ]
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneSpec {
    /// The zone's domain, e.g. `example.com` (a final dot is optional). Cannot change once the
    /// zone exists.
    pub name: String,
    /// Free text Route 53 keeps with the zone (at most 256 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// The records setpoint keeps in the zone. Records others write are left alone; a record
    /// here that someone else already owns is refused, never overwritten.
    #[serde(default)]
    pub records: Vec<RecordSpec>,
}

/// One record set in a [`ZoneSpec`], identified by its name, type and set identifier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordSpec {
    /// `@` (or empty) for the zone's apex, a name relative to the zone (`www`, `*.apps`), or
    /// an absolute name inside the zone (`www.example.com.`; `www.example.com` also works).
    pub name: String,
    /// One of `A`, `AAAA`, `CNAME`, `TXT`, `MX`.
    #[serde(rename = "type")]
    pub record_type: RecordType,
    /// Seconds resolvers may cache the record, [`MIN_TTL`] to [`MAX_TTL`];
    /// [`DEFAULT_TTL`] if absent.
    #[serde(default = "default_ttl")]
    pub ttl: u32,
    /// The values (at least one, at most 100, no duplicates): IPv4 addresses for A, IPv6 for
    /// AAAA, one host name for CNAME, `PRIORITY HOST` for MX, plain text for TXT (it is
    /// quoted and split into 255-character strings for Route 53).
    pub values: Vec<String>,
    /// Makes this one of several weighted record sets with the same name and type
    /// (lowercase letters, digits and `-`, at most 40); needs `weight`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_identifier: Option<String>,
    /// The share of answers this set gets among those with the same name and type (0–255);
    /// only with `set_identifier`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u8>,
}

fn default_ttl() -> u32 {
    DEFAULT_TTL
}

/// A spec together with the setpoint resource it belongs to: what every call that changes a
/// zone needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneRequest {
    /// The setpoint resource (the `dns.zone`); its id marks the zone (tag) and every record
    /// (ownership record) as this resource's.
    pub resource_id: Uuid,
    /// The tenant owning the resource (a tag on the zone).
    pub tenant: String,
    /// What the zone should hold.
    pub spec: ZoneSpec,
}

/// Which zone a call is about: its id as recorded by the step that made it, or, when no id
/// was recorded (the creating attempt crashed before it completed), the token of the unit that
/// created it (the zone's `CallerReference`). The id wins when both are given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneRef {
    /// The zone id, with or without Route 53's `/hostedzone/` prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone_id: Option<String>,
    /// The token of the unit that ran [`crate::Route53Dns::ensure_zone`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_token: Option<IdempotencyToken>,
}

impl ZoneRef {
    /// The zone with this id.
    pub fn id(zone_id: impl Into<String>) -> Self {
        Self {
            zone_id: Some(zone_id.into()),
            create_token: None,
        }
    }

    /// The zone the unit with `token` created.
    pub fn created_by(token: IdempotencyToken) -> Self {
        Self {
            zone_id: None,
            create_token: Some(token),
        }
    }
}

/// The identity of a record set in a zone: absolute lowercase name, type and set identifier.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RecordKey {
    /// Absolute and lowercase, e.g. `www.example.com.`.
    pub name: String,
    /// The record type.
    #[serde(rename = "type")]
    pub record_type: RecordType,
    /// The set identifier of a weighted record set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_identifier: Option<String>,
}

impl fmt::Display for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.record_type, self.name)?;
        if let Some(id) = &self.set_identifier {
            write!(f, " (set {id})")?;
        }
        Ok(())
    }
}

/// One problem in a spec: the field (`records[1].ttl`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{field}: {description}")]
pub struct FieldViolation {
    /// The field's path in the spec.
    pub field: String,
    /// What is wrong and what is allowed.
    pub description: String,
}

/// A spec that cannot be applied, with every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the dns.zone spec is not valid: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct InvalidSpec(pub Vec<FieldViolation>);

/// A record as the adapter wants it, values canonical and sorted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DesiredRecord {
    pub(crate) ttl: u32,
    pub(crate) weight: Option<u8>,
    /// Canonical values, sorted (see [`crate::value`]).
    pub(crate) values: Vec<String>,
}

/// A checked spec: names absolute, values canonical.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Desired {
    /// The zone's absolute name.
    pub(crate) zone: String,
    pub(crate) comment: Option<String>,
    pub(crate) records: BTreeMap<RecordKey, DesiredRecord>,
}

impl ZoneSpec {
    /// Checks the spec without calling AWS (the engine may call this when a request arrives).
    ///
    /// # Errors
    /// [`InvalidSpec`] listing every problem.
    pub fn validate(&self) -> Result<(), InvalidSpec> {
        self.desired().map(|_| ())
    }

    /// The zone's name normalised (`example.com.`), if valid.
    pub fn zone_name(&self) -> Option<String> {
        name::zone_name(&self.name).ok()
    }

    pub(crate) fn desired(&self) -> Result<Desired, InvalidSpec> {
        let mut errors = Vec::new();
        let mut bad = |field: String, description: String| {
            errors.push(FieldViolation { field, description });
        };
        let zone = match name::zone_name(&self.name) {
            Ok(z) => Some(z),
            Err(p) => {
                bad("name".into(), format!("the zone name {p}"));
                None
            }
        };
        if let Some(c) = &self.comment
            && c.chars().count() > MAX_COMMENT_LEN
        {
            bad(
                "comment".into(),
                format!(
                    "has {} characters, at most {MAX_COMMENT_LEN}",
                    c.chars().count()
                ),
            );
        }
        if self.records.len() > MAX_RECORDS {
            bad(
                "records".into(),
                format!(
                    "holds {} records, at most {MAX_RECORDS} per zone",
                    self.records.len()
                ),
            );
        }
        let mut records = BTreeMap::new();
        // Names holding a CNAME, and names holding anything else, to refuse mixing them.
        let mut cname_at = BTreeMap::new();
        let mut other_at = BTreeMap::new();
        // (name, type) → whether its sets are weighted, to refuse mixing weighted and simple.
        let mut weighted: BTreeMap<(String, RecordType), (bool, usize)> = BTreeMap::new();
        for (i, r) in self.records.iter().enumerate() {
            let at = |f: &str| format!("records[{i}]{f}");
            let Some(zone) = &zone else { break };
            let record_name = match name::record_name(&r.name, zone) {
                Ok(n) => n,
                Err(p) => {
                    bad(at(".name"), format!("the record name {p}"));
                    continue;
                }
            };
            if ownership::is_reserved(&record_name) {
                bad(
                    at(".name"),
                    format!(
                        "{:?} starts with {:?}, which setpoint keeps for its ownership records",
                        r.name,
                        ownership::PREFIX
                    ),
                );
            }
            if !(MIN_TTL..=MAX_TTL).contains(&r.ttl) {
                bad(
                    at(".ttl"),
                    format!("is {}; it must be {MIN_TTL} to {MAX_TTL} seconds", r.ttl),
                );
            }
            match (&r.set_identifier, r.weight) {
                (Some(id), Some(_)) => {
                    if id.is_empty()
                        || id.len() > MAX_SET_IDENTIFIER_LEN
                        || !id
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    {
                        bad(
                            at(".set_identifier"),
                            format!(
                                "{id:?} must be 1 to {MAX_SET_IDENTIFIER_LEN} lowercase letters, \
                                 digits or '-'"
                            ),
                        );
                    }
                }
                (Some(_), None) => bad(
                    at(".weight"),
                    "is missing; a record with a set_identifier is weighted and needs a weight \
                     (0-255)"
                        .into(),
                ),
                (None, Some(_)) => bad(
                    at(".set_identifier"),
                    "is missing; a weight only applies to one of several record sets told \
                     apart by set_identifier"
                        .into(),
                ),
                (None, None) => {}
            }
            if r.values.is_empty() {
                bad(at(".values"), "is empty; give at least one value".into());
            }
            if r.values.len() > MAX_VALUES {
                bad(
                    at(".values"),
                    format!("holds {} values, at most {MAX_VALUES}", r.values.len()),
                );
            }
            if r.record_type == RecordType::Cname {
                if r.values.len() > 1 {
                    bad(
                        at(".values"),
                        "holds several values; a CNAME has exactly one".into(),
                    );
                }
                if &record_name == zone {
                    bad(
                        at(".type"),
                        "is CNAME at the zone's apex, which DNS forbids (the apex holds the \
                         zone's SOA and NS records)"
                            .into(),
                    );
                }
                cname_at.entry(record_name.clone()).or_insert(i);
            } else {
                other_at.entry(record_name.clone()).or_insert(i);
            }
            let mut values = BTreeSet::new();
            for (j, v) in r.values.iter().enumerate() {
                match r.record_type.canonical(v) {
                    Ok(c) => {
                        if !values.insert(c) {
                            bad(
                                at(&format!(".values[{j}]")),
                                format!("{v:?} repeats an earlier value of this record"),
                            );
                        }
                    }
                    Err(p) => bad(at(&format!(".values[{j}]")), format!("the value {p}")),
                }
            }
            let chars: usize = values
                .iter()
                .map(|v| r.record_type.write_wire(v).len())
                .sum();
            if chars > MAX_RECORD_CHARS {
                bad(
                    at(".values"),
                    format!(
                        "hold {chars} characters in Route 53's form, at most {MAX_RECORD_CHARS} \
                         per record"
                    ),
                );
            }
            let key = RecordKey {
                name: record_name.clone(),
                record_type: r.record_type,
                set_identifier: r.set_identifier.clone(),
            };
            let owner = ownership::owner_name(&key);
            if owner.trim_end_matches('.').len() > name::MAX_NAME_LEN {
                bad(
                    at(".name"),
                    format!(
                        "is too long: its ownership record {owner} would exceed {} characters; \
                         use a shorter name",
                        name::MAX_NAME_LEN
                    ),
                );
            }
            let is_weighted = r.set_identifier.is_some();
            match weighted.get(&(record_name.clone(), r.record_type)) {
                Some(&(w, first)) if w != is_weighted => bad(
                    at(".set_identifier"),
                    format!(
                        "records[{first}] has the same name and type {} a set_identifier; \
                         record sets of one name and type are either all weighted or one \
                         simple set",
                        if w { "with" } else { "without" }
                    ),
                ),
                _ => {
                    weighted.insert((record_name.clone(), r.record_type), (is_weighted, i));
                }
            }
            if records.contains_key(&key) {
                bad(
                    at(""),
                    format!("repeats {key}; put all its values in one record"),
                );
                continue;
            }
            records.insert(
                key,
                DesiredRecord {
                    ttl: r.ttl,
                    weight: r.weight,
                    values: values.into_iter().collect(),
                },
            );
        }
        for (n, i) in &cname_at {
            if let Some(j) = other_at.get(n) {
                bad(
                    format!("records[{i}]"),
                    format!(
                        "is a CNAME at {n}, where records[{j}] is another type; a CNAME must be \
                         alone at its name"
                    ),
                );
            }
        }
        match zone {
            Some(zone) if errors.is_empty() => Ok(Desired {
                zone,
                comment: self.comment.clone(),
                records,
            }),
            _ => Err(InvalidSpec(errors)),
        }
    }
}

impl ZoneRequest {
    /// Checks the spec and the resource's identity.
    pub(crate) fn desired(&self) -> Result<Desired, InvalidSpec> {
        let tenant_error = if self.tenant.trim().is_empty() || self.tenant.len() > 256 {
            Some(FieldViolation {
                field: "tenant".into(),
                description: "must be 1 to 256 characters (it is a tag value on the zone)".into(),
            })
        } else {
            None
        };
        match (self.spec.desired(), tenant_error) {
            (Ok(d), None) => Ok(d),
            (Ok(_), Some(t)) => Err(InvalidSpec(vec![t])),
            (Err(InvalidSpec(mut v)), t) => {
                v.extend(t);
                Err(InvalidSpec(v))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, t: RecordType, values: &[&str]) -> RecordSpec {
        RecordSpec {
            name: name.into(),
            record_type: t,
            ttl: DEFAULT_TTL,
            values: values.iter().map(|v| (*v).to_owned()).collect(),
            set_identifier: None,
            weight: None,
        }
    }

    fn spec(records: Vec<RecordSpec>) -> ZoneSpec {
        ZoneSpec {
            name: "Example.com".into(),
            comment: None,
            records,
        }
    }

    fn fields(err: InvalidSpec) -> Vec<String> {
        err.0.into_iter().map(|v| v.field).collect()
    }

    #[test]
    fn the_documented_json_parses_and_normalises() {
        let json = r#"{
          "name": "example.com",
          "comment": "team payments",
          "records": [
            { "name": "www", "type": "A", "ttl": 300, "values": ["192.0.2.11", "192.0.2.10"] },
            { "name": "@", "type": "MX", "values": ["10 mail.example.com"] },
            { "name": "@", "type": "TXT", "values": ["v=spf1 include:_spf.example.net -all"] },
            { "name": "api", "type": "CNAME", "values": ["lb-1.example.net"],
              "set_identifier": "blue", "weight": 90 }
          ]
        }"#;
        let spec: ZoneSpec = serde_json::from_str(json).unwrap();
        let d = spec.desired().unwrap();
        assert_eq!(d.zone, "example.com.");
        let www = RecordKey {
            name: "www.example.com.".into(),
            record_type: RecordType::A,
            set_identifier: None,
        };
        assert_eq!(d.records[&www].values, vec!["192.0.2.10", "192.0.2.11"]);
        let mx = d
            .records
            .iter()
            .find(|(k, _)| k.record_type == RecordType::Mx)
            .unwrap();
        assert_eq!(mx.0.name, "example.com.");
        assert_eq!(mx.1.values, vec!["10 mail.example.com."]);
        let api = d
            .records
            .keys()
            .find(|k| k.set_identifier.is_some())
            .unwrap();
        assert_eq!(api.to_string(), "CNAME api.example.com. (set blue)");
        assert_eq!(d.records[api].weight, Some(90));
        let back: ZoneSpec = serde_json::from_value(serde_json::to_value(&spec).unwrap()).unwrap();
        assert_eq!(back, spec);
    }

    #[test]
    fn unknown_fields_and_types_are_refused_by_serde() {
        let err = serde_json::from_str::<ZoneSpec>(r#"{"name":"a.com","ttl":5}"#).unwrap_err();
        assert!(err.to_string().contains("ttl"), "{err}");
        let err = serde_json::from_str::<ZoneSpec>(
            r#"{"name":"a.com","records":[{"name":"x","type":"NS","values":["a."]}]}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("A, AAAA, CNAME, TXT, MX"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let mut bad_ttl = record("www", RecordType::A, &["192.0.2.1"]);
        bad_ttl.ttl = 0;
        let mut weight_only = record("w", RecordType::A, &["192.0.2.1"]);
        weight_only.weight = Some(5);
        let mut bad_set = record("s", RecordType::A, &["192.0.2.1"]);
        bad_set.set_identifier = Some("Blue Team".into());
        bad_set.weight = Some(1);
        let err = spec(vec![
            bad_ttl,
            record("a", RecordType::A, &["not-an-ip"]),
            record("@", RecordType::Cname, &["x.example.net"]),
            record("c", RecordType::Cname, &["x.example.net", "y.example.net"]),
            record("e", RecordType::Txt, &[]),
            weight_only,
            bad_set,
            record("_setpoint-a.www", RecordType::Txt, &["x"]),
            record("www.other.org.", RecordType::A, &["192.0.2.1"]),
            record("d", RecordType::A, &["192.0.2.1", "192.0.2.1"]),
        ])
        .validate()
        .unwrap_err();
        assert_eq!(
            fields(err.clone()),
            vec![
                "records[0].ttl",
                "records[1].values[0]",
                "records[2].type",
                "records[3].values",
                "records[4].values",
                "records[5].set_identifier",
                "records[6].set_identifier",
                "records[7].name",
                "records[8].name",
                "records[9].values[1]",
            ]
        );
        let text = err.to_string();
        assert!(text.contains("1 to 604800 seconds"), "{text}");
        assert!(text.contains("IPv4"), "{text}");
    }

    #[test]
    fn conflicts_between_records_are_refused() {
        let err = spec(vec![
            record("www", RecordType::Cname, &["x.example.net"]),
            record("www", RecordType::Txt, &["hello"]),
            record("a", RecordType::A, &["192.0.2.1"]),
            record("A.example.com", RecordType::A, &["192.0.2.2"]),
        ])
        .validate()
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("repeats A a.example.com."), "{text}");
        assert!(text.contains("alone at its name"), "{text}");
        let mut weighted = record("m", RecordType::A, &["192.0.2.1"]);
        weighted.set_identifier = Some("one".into());
        weighted.weight = Some(1);
        let err = spec(vec![weighted, record("m", RecordType::A, &["192.0.2.2"])])
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("all weighted"), "{err}");
    }

    #[test]
    fn zone_problems_and_tenants() {
        let err = ZoneSpec {
            name: "localhost".into(),
            comment: Some("x".repeat(300)),
            records: vec![],
        }
        .validate()
        .unwrap_err();
        assert_eq!(fields(err), vec!["name", "comment"]);
        let req = ZoneRequest {
            resource_id: Uuid::new_v4(),
            tenant: " ".into(),
            spec: spec(vec![]),
        };
        assert_eq!(fields(req.desired().unwrap_err()), vec!["tenant"]);
    }
}
