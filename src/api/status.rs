//! The instance life cycle as the API shows it.
//!
//! The transitions live in one place, the `setpoint_instance_status` trigger of
//! `migrations/0002_api.sql`, because two writers change the facts it reads: the API (which
//! sets `operation` and `has_active_work` when it accepts a change) and the worker runtime
//! (which clears `has_active_work` when a chain of units ends, and sets it again when an
//! operator retries a parked unit). The trigger derives `status` from those facts:
//!
//! | event                                            | status                              |
//! |--------------------------------------------------|-------------------------------------|
//! | API Create / Update / Delete accepted            | `CREATING` / `UPDATING` / `DELETING` |
//! | chain ends, a unit of the instance is parked     | `FAILED` (operation kept)           |
//! | operator retries the parked unit                 | back to the operation's `…ING`      |
//! | chain ends, nothing parked, operation `delete`   | `DELETED` (tombstone, name freed)   |
//! | chain ends, nothing parked, `create` / `update`  | `READY`, observed_generation = generation |
//!
//! While any unit of an instance is in the work table (pending, running or parked) the API
//! refuses changes with `FAILED_PRECONDITION` naming that unit.

use super::proto::InstanceStatus;

/// A stored status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceState {
    /// Create work queued or running.
    Creating,
    /// Last change done.
    Ready,
    /// Update work queued or running.
    Updating,
    /// Delete work queued or running.
    Deleting,
    /// Gone.
    Deleted,
    /// A unit is parked for an operator.
    Failed,
    /// A value this version does not know (written by a newer one).
    Unknown,
}

impl InstanceState {
    /// From the `instances.status` column.
    pub fn from_db(s: &str) -> Self {
        match s {
            "CREATING" => Self::Creating,
            "READY" => Self::Ready,
            "UPDATING" => Self::Updating,
            "DELETING" => Self::Deleting,
            "DELETED" => Self::Deleted,
            "FAILED" => Self::Failed,
            _ => Self::Unknown,
        }
    }

    /// The column value, `None` for unknown.
    pub fn db(self) -> Option<&'static str> {
        Some(match self {
            Self::Creating => "CREATING",
            Self::Ready => "READY",
            Self::Updating => "UPDATING",
            Self::Deleting => "DELETING",
            Self::Deleted => "DELETED",
            Self::Failed => "FAILED",
            Self::Unknown => return None,
        })
    }

    /// The API enum.
    pub fn proto(self) -> InstanceStatus {
        match self {
            Self::Creating => InstanceStatus::Creating,
            Self::Ready => InstanceStatus::Ready,
            Self::Updating => InstanceStatus::Updating,
            Self::Deleting => InstanceStatus::Deleting,
            Self::Deleted => InstanceStatus::Deleted,
            Self::Failed => InstanceStatus::Failed,
            Self::Unknown => InstanceStatus::Unspecified,
        }
    }

    /// From the API enum (`Unspecified` → `None`).
    pub fn from_proto(s: InstanceStatus) -> Option<Self> {
        Some(match s {
            InstanceStatus::Unspecified => return None,
            InstanceStatus::Creating => Self::Creating,
            InstanceStatus::Ready => Self::Ready,
            InstanceStatus::Updating => Self::Updating,
            InstanceStatus::Deleting => Self::Deleting,
            InstanceStatus::Deleted => Self::Deleted,
            InstanceStatus::Failed => Self::Failed,
        })
    }
}
