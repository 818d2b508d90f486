//! What the adapter reports: the zone ([`ZoneInfo`]), our records ([`ObservedRecord`]), how
//! they differ from the spec ([`Drift`]), and what a sync or a delete did.
//!
//! All of it is `serde` (de)serialisable, so a step can put it in its output as it is.

use serde::{Deserialize, Serialize};

use crate::spec::RecordKey;

/// A hosted zone as Route 53 reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZoneInfo {
    /// The zone id without Route 53's `/hostedzone/` prefix, e.g. `Z0123456789ABCDEFGHIJ`.
    pub id: String,
    /// The zone's name, absolute and lowercase (`example.com.`).
    pub name: String,
    /// The name servers to delegate the domain to (empty if Route 53 did not say).
    pub name_servers: Vec<String>,
    /// The zone's comment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// The zone's `CallerReference`: the token of the unit that created it.
    pub caller_reference: String,
    /// True when [`crate::Route53Dns::ensure_zone`] found the zone an earlier attempt made
    /// instead of creating it.
    #[serde(default)]
    pub adopted: bool,
}

/// A record set's contents, as the spec wants them or as Route 53 holds them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordValues {
    /// The TTL in seconds (absent for an alias record, which setpoint never writes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u32>,
    /// The weight of a weighted set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u8>,
    /// Values in canonical form (see the crate's README), sorted.
    pub values: Vec<String>,
}

/// A record set of ours (its ownership record names our resource) as Route 53 holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedRecord {
    /// Which record set.
    #[serde(flatten)]
    pub key: RecordKey,
    /// What it holds.
    #[serde(flatten)]
    pub contents: RecordValues,
}

/// One way the zone differs from its spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "drift", rename_all = "snake_case")]
pub enum Drift {
    /// The zone does not exist (deleted outside setpoint, or never created).
    ZoneMissing,
    /// The zone's comment is not the spec's.
    CommentChanged {
        /// The spec's comment.
        desired: Option<String>,
        /// The zone's comment.
        observed: Option<String>,
    },
    /// A record of the spec is not in the zone.
    RecordMissing {
        /// Which record.
        record: RecordKey,
    },
    /// A record of ours holds other contents than the spec's.
    RecordChanged {
        /// Which record.
        record: RecordKey,
        /// What the spec wants.
        desired: RecordValues,
        /// What the zone holds.
        observed: RecordValues,
    },
    /// A record of the spec exists but is not ours (or another resource claims its name): a
    /// sync refuses it.
    RecordNotOwned {
        /// Which record.
        record: RecordKey,
        /// Who holds it, for a person.
        reason: String,
    },
    /// A record of ours that the spec no longer holds (a sync deletes it).
    RecordUnexpected {
        /// Which record.
        record: RecordKey,
    },
}

/// What [`crate::Route53Dns::observe_zone`] saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZoneObservation {
    /// The zone, or `None` if it does not exist.
    pub zone: Option<ZoneInfo>,
    /// Our record sets in the zone (ownership records not included), sorted by key.
    pub records: Vec<ObservedRecord>,
    /// How the zone differs from the spec; empty when it matches.
    pub drift: Vec<Drift>,
}

impl ZoneObservation {
    /// True when the zone exists and matches the spec.
    pub fn in_sync(&self) -> bool {
        self.zone.is_some() && self.drift.is_empty()
    }
}

/// What [`crate::Route53Dns::sync_records`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncOutcome {
    /// The zone's id.
    pub zone_id: String,
    /// Records written because they were missing.
    pub created: Vec<RecordKey>,
    /// Records of ours whose contents were changed.
    pub updated: Vec<RecordKey>,
    /// Records of ours deleted because the spec no longer holds them.
    pub deleted: Vec<RecordKey>,
    /// Records that already matched the spec.
    pub unchanged: Vec<RecordKey>,
    /// Whether the zone's comment was changed.
    pub comment_updated: bool,
    /// `ChangeResourceRecordSets` calls made (0 when nothing changed).
    pub change_batches: usize,
}

/// What [`crate::Route53Dns::delete_zone`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteOutcome {
    /// The zone's id, if the zone was found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone_id: Option<String>,
    /// Our records deleted before the zone.
    pub records_deleted: Vec<RecordKey>,
    /// True when this call deleted the zone.
    pub zone_deleted: bool,
    /// True when the zone was already gone (deleted by an earlier attempt, or never made).
    pub already_gone: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::RecordType;

    #[test]
    fn observations_round_trip_through_json_in_a_flat_shape() {
        let key = RecordKey {
            name: "www.example.com.".into(),
            record_type: RecordType::A,
            set_identifier: None,
        };
        let contents = RecordValues {
            ttl: Some(300),
            weight: None,
            values: vec!["192.0.2.1".into()],
        };
        let obs = ZoneObservation {
            zone: None,
            records: vec![ObservedRecord {
                key: key.clone(),
                contents: contents.clone(),
            }],
            drift: vec![
                Drift::ZoneMissing,
                Drift::RecordChanged {
                    record: key,
                    desired: contents.clone(),
                    observed: contents,
                },
            ],
        };
        let json = serde_json::to_value(&obs).unwrap();
        assert_eq!(
            json["records"][0],
            serde_json::json!({
                "name": "www.example.com.", "type": "A", "ttl": 300, "values": ["192.0.2.1"]
            })
        );
        assert_eq!(
            json["drift"][0],
            serde_json::json!({ "drift": "zone_missing" })
        );
        assert_eq!(json["drift"][1]["record"]["type"], "A");
        let back: ZoneObservation = serde_json::from_value(json).unwrap();
        assert_eq!(back, obs);
    }
}
