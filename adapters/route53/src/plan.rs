//! From what a zone holds and what the spec wants to the change batches that close the gap:
//! the adapter's decisions, with no network in them, so unit tests cover every case.
//!
//! 1. [`Index`]: the zone's record sets by key, and its ownership records by the key they own.
//! 2. [`assess`]: for each record of the spec, whether it is there and ours (`Same`,
//!    `Changed`), absent (`Missing`) or held by someone else (`Blocked`); and which records of
//!    ours the spec no longer holds (leftovers).
//! 3. [`plan`]: the changes. A missing record is written with `UPSERT` together with its
//!    ownership record, in one batch; a record of ours is changed with `UPSERT`; a leftover is
//!    deleted with its ownership record, in one batch, with the contents Route 53 showed
//!    (which `DELETE` requires). Anything blocked refuses the whole sync before any change.
//!
//! Why `UPSERT` and not `CREATE` for a missing record, although `CREATE` would make Route 53
//! itself refuse a record someone wrote in the milliseconds between the read and the write:
//! moto refuses to `CREATE` a record identical to one deleted earlier whenever any record
//! sorts after it in the zone (it checks its change journal, then every record from that name
//! on), so "remove a record, later add it back" would fail against moto for ever. The
//! ownership check before the write is what keeps others' records safe; the remaining window
//! is the time between `ListResourceRecordSets` and `ChangeResourceRecordSets`.
//! 4. [`drift`]: the same assessment as a list of differences, for observation.

use std::collections::BTreeMap;

use aws_sdk_route53::types::{Change, ChangeAction, ResourceRecord, ResourceRecordSet, RrType};
use setpoint_adapter::AdapterError;
use uuid::Uuid;

use crate::name;
use crate::observation::{Drift, ObservedRecord, RecordValues};
use crate::ownership::{self, OWNERSHIP_TTL, Owner};
use crate::spec::{DesiredRecord, RecordKey};
use crate::value::RecordType;

/// Route 53's limit of `ResourceRecord` elements in one request (an `UPSERT` counts twice).
pub(crate) const MAX_BATCH_RECORDS: usize = 1000;
/// Route 53's limit of value characters in one request (an `UPSERT` counts twice).
pub(crate) const MAX_BATCH_CHARS: usize = 32_000;

/// Error code of a sync or delete refused because a record is not ours.
pub const CODE_NOT_OWNED: &str = "route53-record-not-owned";

/// A record set as Route 53 returned it, with its name in this crate's form.
#[derive(Debug, Clone)]
pub(crate) struct Rrset {
    /// Absolute, lowercase, escapes decoded.
    pub(crate) name: String,
    /// Route 53's type name (`A`, `SOA`, …).
    pub(crate) rtype: String,
    /// What Route 53 returned, sent back as is to delete it.
    pub(crate) raw: ResourceRecordSet,
}

impl Rrset {
    pub(crate) fn new(raw: ResourceRecordSet) -> Self {
        Self {
            name: name::from_route53(raw.name()),
            rtype: raw.r#type().as_str().to_owned(),
            raw,
        }
    }

    fn wire_values(&self) -> Vec<String> {
        self.raw
            .resource_records()
            .iter()
            .map(|r| r.value().to_owned())
            .collect()
    }

    /// The key this record set would have in a spec, if its type is one we manage.
    fn key(&self) -> Option<RecordKey> {
        Some(RecordKey {
            name: self.name.clone(),
            record_type: self.rtype.parse().ok()?,
            set_identifier: self.raw.set_identifier().map(str::to_owned),
        })
    }

    /// The key of the record this is the ownership record of, if it is one.
    fn owned_key(&self) -> Option<RecordKey> {
        if self.rtype != "TXT" {
            return None;
        }
        ownership::owned_key(&self.name)
    }

    /// Its contents in canonical form.
    pub(crate) fn contents(&self, t: RecordType) -> RecordValues {
        let mut values: Vec<String> = self.wire_values().iter().map(|v| t.read_wire(v)).collect();
        values.sort();
        RecordValues {
            ttl: self.raw.ttl().and_then(|v| u32::try_from(v).ok()),
            weight: self.raw.weight().and_then(|v| u8::try_from(v).ok()),
            values,
        }
    }

    /// The zone's own SOA or NS at its apex, which nothing here ever touches.
    pub(crate) fn is_apex_soa_or_ns(&self, zone: &str) -> bool {
        self.name == zone && (self.rtype == "SOA" || self.rtype == "NS")
    }

    /// `TYPE name`, for messages.
    pub(crate) fn describe(&self) -> String {
        match self.raw.set_identifier() {
            Some(id) => format!("{} {} (set {id})", self.rtype, self.name),
            None => format!("{} {}", self.rtype, self.name),
        }
    }
}

/// A zone's record sets by key and its ownership records by the key they own.
pub(crate) struct Index<'a> {
    all: &'a [Rrset],
    resource: Uuid,
    records: BTreeMap<RecordKey, &'a Rrset>,
    owners: BTreeMap<RecordKey, (&'a Rrset, Owner)>,
}

impl<'a> Index<'a> {
    /// Indexes `all` (every record set of one zone) for `resource`.
    pub(crate) fn new(all: &'a [Rrset], resource: Uuid) -> Self {
        let mut records = BTreeMap::new();
        let mut owners = BTreeMap::new();
        for r in all {
            if let Some(owned) = r.owned_key() {
                owners.insert(owned, (r, Owner::read(&r.wire_values())));
            } else if let Some(key) = r.key() {
                records.insert(key, r);
            }
        }
        Self {
            all,
            resource,
            records,
            owners,
        }
    }

    fn owned_by_us(&self, key: &RecordKey) -> bool {
        matches!(self.owners.get(key), Some((_, Owner::Resource(id))) if *id == self.resource)
    }

    /// True for our record sets and our ownership records.
    pub(crate) fn is_ours(&self, r: &Rrset) -> bool {
        match r.owned_key() {
            Some(owned) => self.owned_by_us(&owned),
            None => r.key().is_some_and(|k| self.owned_by_us(&k)),
        }
    }

    /// Record sets at `name` that are not ours.
    fn foreign_at(&self, name: &str) -> Vec<&'a Rrset> {
        self.all
            .iter()
            .filter(|r| r.name == name && !self.is_ours(r))
            .collect()
    }

    /// Every record set that is neither ours nor the apex SOA/NS: what keeps a zone from
    /// being deleted.
    pub(crate) fn foreign(&self, zone: &str) -> Vec<&'a Rrset> {
        self.all
            .iter()
            .filter(|r| !r.is_apex_soa_or_ns(zone) && !self.is_ours(r))
            .collect()
    }

    /// Our record sets (not ownership records), by key.
    pub(crate) fn ours(&self) -> Vec<ObservedRecord> {
        self.records
            .iter()
            .filter(|(k, _)| self.owned_by_us(k))
            .map(|(k, r)| ObservedRecord {
                key: k.clone(),
                contents: r.contents(k.record_type),
            })
            .collect()
    }
}

/// Where one record of the spec stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Status {
    /// Ours, with the spec's contents.
    Same,
    /// Not in the zone (our ownership record may still be there).
    Missing,
    /// Ours, with other contents.
    Changed { observed: RecordValues },
    /// Someone else's (or in the way of a CNAME); `reason` is for a person.
    Blocked { reason: String },
}

/// A record of ours the spec no longer holds.
pub(crate) struct Leftover<'a> {
    pub(crate) key: RecordKey,
    /// The record set, unless it is already gone.
    pub(crate) record: Option<&'a Rrset>,
    /// Its ownership record.
    pub(crate) owner: &'a Rrset,
}

/// The spec's records against the zone.
pub(crate) struct Assessment<'a> {
    pub(crate) records: Vec<(RecordKey, Status)>,
    pub(crate) leftovers: Vec<Leftover<'a>>,
}

/// Compares the spec's records with the zone.
pub(crate) fn assess<'a>(
    index: &Index<'a>,
    desired: &BTreeMap<RecordKey, DesiredRecord>,
) -> Assessment<'a> {
    let mut records = Vec::with_capacity(desired.len());
    for (key, want) in desired {
        let owner_name = ownership::owner_name(key);
        let existing = index.records.get(key).copied();
        let status = match (index.owners.get(key), existing) {
            (Some((_, Owner::Resource(id))), _) if *id != index.resource => Status::Blocked {
                reason: format!(
                    "its ownership record {owner_name} names setpoint resource {id}: another \
                     dns.zone resource manages it"
                ),
            },
            (Some((_, Owner::Unreadable)), _) => Status::Blocked {
                reason: format!(
                    "a TXT record at its ownership name {owner_name} exists that setpoint did \
                     not write"
                ),
            },
            (None, Some(_)) => Status::Blocked {
                reason: format!(
                    "it exists and setpoint did not write it (no ownership record \
                     {owner_name})"
                ),
            },
            (_, None) => Status::Missing,
            (Some(_), Some(r)) => {
                let observed = r.contents(key.record_type);
                if r.raw.alias_target().is_none() && observed == values_of(want) {
                    Status::Same
                } else {
                    Status::Changed { observed }
                }
            }
        };
        let status = match status {
            Status::Missing | Status::Same | Status::Changed { .. } => {
                cname_conflict(index, key).map_or(status, |reason| Status::Blocked { reason })
            }
            blocked => blocked,
        };
        records.push((key.clone(), status));
    }
    let leftovers = index
        .owners
        .iter()
        .filter(|(k, _)| index.owned_by_us(k) && !desired.contains_key(k))
        .map(|(k, (owner, _))| Leftover {
            key: k.clone(),
            record: index.records.get(k).copied(),
            owner,
        })
        .collect();
    Assessment { records, leftovers }
}

/// Why `key` cannot be written next to what others hold at its name: a CNAME must be alone.
fn cname_conflict(index: &Index<'_>, key: &RecordKey) -> Option<String> {
    let foreign: Vec<&Rrset> = index
        .foreign_at(&key.name)
        .into_iter()
        .filter(|r| r.key().as_ref() != Some(key))
        .collect();
    if key.record_type == RecordType::Cname {
        let first = foreign.first()?;
        Some(format!(
            "a CNAME must be alone at its name, and {} (not setpoint's) is there",
            first.describe()
        ))
    } else {
        let cname = foreign.iter().find(|r| r.rtype == "CNAME")?;
        Some(format!(
            "{} (not setpoint's) is there, and a CNAME must be alone at its name",
            cname.describe()
        ))
    }
}

fn values_of(want: &DesiredRecord) -> RecordValues {
    RecordValues {
        ttl: Some(want.ttl),
        weight: want.weight,
        values: want.values.clone(),
    }
}

/// The changes a sync makes, in batches, and what they do to which record.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// Change batches in order: deletions first (a record changing its type or routing may
    /// need the old one gone), each record's changes always in one batch.
    pub(crate) batches: Vec<Vec<Change>>,
    pub(crate) created: Vec<RecordKey>,
    pub(crate) updated: Vec<RecordKey>,
    pub(crate) deleted: Vec<RecordKey>,
    pub(crate) unchanged: Vec<RecordKey>,
}

/// The changes that bring the zone to `desired`.
///
/// # Errors
/// A permanent [`AdapterError`] with code [`CODE_NOT_OWNED`] naming every blocked record, and
/// nothing planned; or a permanent error if the SDK refuses to build a change (a bug).
pub(crate) fn plan(
    assessment: &Assessment<'_>,
    desired: &BTreeMap<RecordKey, DesiredRecord>,
    resource: Uuid,
) -> Result<Plan, AdapterError> {
    let blocked: Vec<String> = assessment
        .records
        .iter()
        .filter_map(|(k, s)| match s {
            Status::Blocked { reason } => Some(format!("{k}: {reason}")),
            _ => None,
        })
        .collect();
    if !blocked.is_empty() {
        return Err(AdapterError::permanent(format!(
            "refusing to write records that are not this resource's (setpoint never overwrites \
             them): {}. Delete or rename them in Route 53, or take them out of the spec, then \
             retry the unit",
            blocked.join("; ")
        ))
        .with_code(CODE_NOT_OWNED));
    }
    let mut out = Plan::default();
    let mut units: Vec<Vec<Change>> = Vec::new();
    for leftover in &assessment.leftovers {
        let mut unit = Vec::with_capacity(2);
        if let Some(r) = leftover.record {
            unit.push(change(ChangeAction::Delete, r.raw.clone())?);
        }
        unit.push(change(ChangeAction::Delete, leftover.owner.raw.clone())?);
        units.push(unit);
        out.deleted.push(leftover.key.clone());
    }
    for (key, status) in &assessment.records {
        let Some(want) = desired.get(key) else {
            continue;
        };
        match status {
            Status::Same => out.unchanged.push(key.clone()),
            Status::Missing => {
                units.push(vec![
                    change(ChangeAction::Upsert, record_set(key, want)?)?,
                    change(ChangeAction::Upsert, ownership_set(key, resource)?)?,
                ]);
                out.created.push(key.clone());
            }
            Status::Changed { .. } => {
                units.push(vec![change(ChangeAction::Upsert, record_set(key, want)?)?]);
                out.updated.push(key.clone());
            }
            Status::Blocked { .. } => {}
        }
    }
    out.batches = pack(units);
    Ok(out)
}

/// Packs units (a record's changes, which must stay together) into batches within Route 53's
/// request limits, keeping their order.
fn pack(units: Vec<Vec<Change>>) -> Vec<Vec<Change>> {
    let mut batches: Vec<Vec<Change>> = Vec::new();
    let (mut records, mut chars) = (0, 0);
    for unit in units {
        let (r, c) = unit
            .iter()
            .map(weight)
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        let fits = records + r <= MAX_BATCH_RECORDS && chars + c <= MAX_BATCH_CHARS;
        match batches.last_mut() {
            Some(batch) if fits => batch.extend(unit),
            _ => {
                batches.push(unit);
                (records, chars) = (0, 0);
            }
        }
        records += r;
        chars += c;
    }
    batches
}

/// What a change counts towards Route 53's request limits: (records, value characters).
fn weight(change: &Change) -> (usize, usize) {
    let set = change.resource_record_set();
    let factor = if *change.action() == ChangeAction::Upsert {
        2
    } else {
        1
    };
    let (n, chars) = set.map_or((0, 0), |s| {
        (
            s.resource_records().len(),
            s.resource_records().iter().map(|r| r.value().len()).sum(),
        )
    });
    (n * factor, chars * factor)
}

/// The record set the spec wants for `key`.
fn record_set(key: &RecordKey, want: &DesiredRecord) -> Result<ResourceRecordSet, AdapterError> {
    let mut b = ResourceRecordSet::builder()
        .name(&key.name)
        .r#type(RrType::from(key.record_type.as_str()))
        .ttl(i64::from(want.ttl))
        .set_set_identifier(key.set_identifier.clone())
        .set_weight(want.weight.map(i64::from));
    for v in &want.values {
        b = b.resource_records(resource_record(key.record_type.write_wire(v))?);
    }
    b.build().map_err(build_error)
}

/// The ownership record of `key`, naming `resource`.
fn ownership_set(key: &RecordKey, resource: Uuid) -> Result<ResourceRecordSet, AdapterError> {
    ResourceRecordSet::builder()
        .name(ownership::owner_name(key))
        .r#type(RrType::Txt)
        .ttl(i64::from(OWNERSHIP_TTL))
        .resource_records(resource_record(ownership::owner_value(resource))?)
        .build()
        .map_err(build_error)
}

fn resource_record(value: String) -> Result<ResourceRecord, AdapterError> {
    ResourceRecord::builder()
        .value(value)
        .build()
        .map_err(build_error)
}

fn change(action: ChangeAction, set: ResourceRecordSet) -> Result<Change, AdapterError> {
    Change::builder()
        .action(action)
        .resource_record_set(set)
        .build()
        .map_err(build_error)
}

pub(crate) fn build_error(e: impl std::fmt::Display) -> AdapterError {
    AdapterError::permanent(format!(
        "the Route 53 request could not be built (a bug in setpoint-route53): {e}"
    ))
    .with_code("route53-construction")
}

/// The assessment as differences, for an observation.
pub(crate) fn drift(
    assessment: &Assessment<'_>,
    desired: &BTreeMap<RecordKey, DesiredRecord>,
) -> Vec<Drift> {
    let mut out = Vec::new();
    for (key, status) in &assessment.records {
        match status {
            Status::Same => {}
            Status::Missing => out.push(Drift::RecordMissing {
                record: key.clone(),
            }),
            Status::Changed { observed } => {
                if let Some(want) = desired.get(key) {
                    out.push(Drift::RecordChanged {
                        record: key.clone(),
                        desired: values_of(want),
                        observed: observed.clone(),
                    });
                }
            }
            Status::Blocked { reason } => out.push(Drift::RecordNotOwned {
                record: key.clone(),
                reason: reason.clone(),
            }),
        }
    }
    for leftover in &assessment.leftovers {
        out.push(Drift::RecordUnexpected {
            record: leftover.key.clone(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{RecordSpec, ZoneSpec};

    const ZONE: &str = "example.com.";

    fn rrset(name: &str, t: &str, ttl: i64, values: &[&str], set: Option<(&str, i64)>) -> Rrset {
        let mut b = ResourceRecordSet::builder()
            .name(name)
            .r#type(RrType::from(t))
            .ttl(ttl);
        for v in values {
            b = b.resource_records(ResourceRecord::builder().value(*v).build().unwrap());
        }
        if let Some((id, w)) = set {
            b = b.set_identifier(id).weight(w);
        }
        Rrset::new(b.build().unwrap())
    }

    fn owner(name: &str, resource: Uuid) -> Rrset {
        rrset(name, "TXT", 300, &[&ownership::owner_value(resource)], None)
    }

    fn apex() -> Vec<Rrset> {
        vec![
            rrset(
                ZONE,
                "SOA",
                900,
                &["ns-1. hostmaster. 1 7200 900 1209600 86400"],
                None,
            ),
            rrset(ZONE, "NS", 172_800, &["ns-1.", "ns-2."], None),
        ]
    }

    fn desired(records: &[(&str, RecordType, &[&str])]) -> BTreeMap<RecordKey, DesiredRecord> {
        ZoneSpec {
            name: ZONE.into(),
            comment: None,
            records: records
                .iter()
                .map(|(n, t, v)| RecordSpec {
                    name: (*n).into(),
                    record_type: *t,
                    ttl: 300,
                    values: v.iter().map(|s| (*s).to_owned()).collect(),
                    set_identifier: None,
                    weight: None,
                })
                .collect(),
        }
        .desired()
        .unwrap()
        .records
    }

    fn actions(p: &Plan) -> Vec<Vec<String>> {
        p.batches
            .iter()
            .map(|b| {
                b.iter()
                    .map(|c| {
                        let s = c.resource_record_set().unwrap();
                        format!(
                            "{} {} {}",
                            c.action().as_str(),
                            s.r#type().as_str(),
                            s.name()
                        )
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn a_new_record_is_written_with_its_ownership_record_in_one_batch() {
        let me = Uuid::new_v4();
        let all = apex();
        let want = desired(&[("www", RecordType::A, &["192.0.2.1"])]);
        let index = Index::new(&all, me);
        let a = assess(&index, &want);
        let p = plan(&a, &want, me).unwrap();
        assert_eq!(
            actions(&p),
            vec![vec![
                "UPSERT A www.example.com.",
                "UPSERT TXT _setpoint-a.www.example.com."
            ]]
        );
        assert_eq!(p.created.len(), 1);
        assert_eq!(
            drift(&a, &want),
            vec![Drift::RecordMissing {
                record: want.keys().next().unwrap().clone()
            }]
        );
        assert!(index.foreign(ZONE).is_empty(), "SOA and NS are not foreign");
    }

    #[test]
    fn our_records_are_recognised_unchanged_or_upserted() {
        let me = Uuid::new_v4();
        let mut all = apex();
        all.push(rrset("www.example.com.", "A", 300, &["192.0.2.1"], None));
        all.push(owner("_setpoint-a.www.example.com.", me));
        let same = desired(&[("www", RecordType::A, &["192.0.2.1"])]);
        let index = Index::new(&all, me);
        let a = assess(&index, &same);
        assert_eq!(a.records[0].1, Status::Same);
        let p = plan(&a, &same, me).unwrap();
        assert!(p.batches.is_empty() && p.unchanged.len() == 1);
        assert!(drift(&a, &same).is_empty());
        assert_eq!(index.ours().len(), 1);

        let changed = desired(&[("www", RecordType::A, &["192.0.2.2", "192.0.2.1"])]);
        let a = assess(&index, &changed);
        let p = plan(&a, &changed, me).unwrap();
        assert_eq!(actions(&p), vec![vec!["UPSERT A www.example.com."]]);
        match &drift(&a, &changed)[0] {
            Drift::RecordChanged {
                observed, desired, ..
            } => {
                assert_eq!(observed.values, vec!["192.0.2.1"]);
                assert_eq!(desired.values, vec!["192.0.2.1", "192.0.2.2"]);
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn records_of_others_are_refused_with_a_reason() {
        let me = Uuid::new_v4();
        let other = Uuid::new_v4();
        let mut all = apex();
        all.push(rrset("www.example.com.", "A", 60, &["198.51.100.7"], None));
        all.push(owner("_setpoint-a.api.example.com.", other));
        all.push(rrset(
            "_setpoint-txt.example.com.",
            "TXT",
            60,
            &["\"hand made\""],
            None,
        ));
        all.push(rrset(
            "alias.example.com.",
            "CNAME",
            60,
            &["x.example.net."],
            None,
        ));
        let want = desired(&[
            ("www", RecordType::A, &["192.0.2.1"]),
            ("api", RecordType::A, &["192.0.2.1"]),
            ("@", RecordType::Txt, &["hello"]),
            ("alias", RecordType::Txt, &["hello"]),
            ("ok", RecordType::A, &["192.0.2.1"]),
        ]);
        let index = Index::new(&all, me);
        let a = assess(&index, &want);
        let err = plan(&a, &want, me).unwrap_err();
        assert!(!err.is_transient());
        assert_eq!(err.code.as_deref(), Some(CODE_NOT_OWNED));
        for needle in [
            "A www.example.com.: it exists and setpoint did not write it",
            &format!("names setpoint resource {other}"),
            "TXT example.com.: a TXT record at its ownership name",
            "CNAME alias.example.com. (not setpoint's)",
        ] {
            assert!(err.message.contains(needle), "{needle}: {}", err.message);
        }
        assert!(!err.message.contains("ok.example.com"), "{}", err.message);
        assert_eq!(
            drift(&a, &want)
                .iter()
                .filter(|d| matches!(d, Drift::RecordNotOwned { .. }))
                .count(),
            4
        );
        assert_eq!(index.foreign(ZONE).len(), 4);
    }

    #[test]
    fn records_no_longer_wanted_are_deleted_first_with_their_ownership_records() {
        let me = Uuid::new_v4();
        let mut all = apex();
        all.push(rrset(
            "old.example.com.",
            "CNAME",
            300,
            &["x.example.net."],
            None,
        ));
        all.push(owner("_setpoint-cname.old.example.com.", me));
        // An ownership record whose record someone deleted by hand.
        all.push(owner("_setpoint-mx.example.com.", me));
        let want = desired(&[("old", RecordType::A, &["192.0.2.1"])]);
        let index = Index::new(&all, me);
        let a = assess(&index, &want);
        let p = plan(&a, &want, me).unwrap();
        assert_eq!(
            actions(&p),
            vec![vec![
                "DELETE TXT _setpoint-mx.example.com.",
                "DELETE CNAME old.example.com.",
                "DELETE TXT _setpoint-cname.old.example.com.",
                "UPSERT A old.example.com.",
                "UPSERT TXT _setpoint-a.old.example.com.",
            ]]
        );
        assert_eq!(p.deleted.len(), 2);
        let deleted = &p.batches[0][1];
        assert_eq!(
            deleted.resource_record_set().unwrap().ttl(),
            Some(300),
            "a delete repeats what Route 53 showed"
        );
    }

    #[test]
    fn a_record_lost_by_hand_is_written_again_with_its_ownership_record() {
        let me = Uuid::new_v4();
        let mut all = apex();
        all.push(owner("_setpoint-a.www.example.com.", me));
        let want = desired(&[("www", RecordType::A, &["192.0.2.1"])]);
        let index = Index::new(&all, me);
        let p = plan(&assess(&index, &want), &want, me).unwrap();
        assert_eq!(
            actions(&p),
            vec![vec![
                "UPSERT A www.example.com.",
                "UPSERT TXT _setpoint-a.www.example.com."
            ]]
        );
    }

    #[test]
    fn weighted_sets_are_told_apart() {
        let me = Uuid::new_v4();
        let mut all = apex();
        all.push(rrset(
            "api.example.com.",
            "A",
            300,
            &["192.0.2.1"],
            Some(("blue", 10)),
        ));
        all.push(owner("_setpoint-a-blue.api.example.com.", me));
        all.push(rrset(
            "api.example.com.",
            "A",
            300,
            &["192.0.2.2"],
            Some(("green", 10)),
        ));
        let index = Index::new(&all, me);
        let ours = index.ours();
        assert_eq!(ours.len(), 1);
        assert_eq!(ours[0].key.set_identifier.as_deref(), Some("blue"));
        assert_eq!(ours[0].contents.weight, Some(10));
        assert_eq!(index.foreign(ZONE).len(), 1);
    }

    #[test]
    fn large_changes_are_split_without_separating_a_record_from_its_owner() {
        let me = Uuid::new_v4();
        let all = apex();
        let text = "t".repeat(3000);
        let records: Vec<(String, RecordType, Vec<&str>)> = (0..30)
            .map(|i| (format!("r{i}"), RecordType::Txt, vec![text.as_str()]))
            .collect();
        let refs: Vec<(&str, RecordType, &[&str])> = records
            .iter()
            .map(|(n, t, v)| (n.as_str(), *t, v.as_slice()))
            .collect();
        let want = desired(&refs);
        let index = Index::new(&all, me);
        let p = plan(&assess(&index, &want), &want, me).unwrap();
        assert!(p.batches.len() > 1);
        for batch in &p.batches {
            assert_eq!(batch.len() % 2, 0, "pairs stay together");
            let chars: usize = batch.iter().map(|c| weight(c).1).sum();
            assert!(chars <= MAX_BATCH_CHARS);
        }
        assert_eq!(p.batches.iter().map(Vec::len).sum::<usize>(), 60);
    }
}
