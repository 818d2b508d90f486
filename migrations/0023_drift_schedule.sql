-- The drift schedule moves out of `instances` (issue 19). Forward-only: never edit a released
-- migration.
--
-- Before, each check moved `instances.next_observe_at` one interval on: a non-HOT update of a
-- wide row and all its indexes per check, measured at about 280 µs of PostgreSQL per check at
-- 1M resources (`setpoint bench scale`), five times the budget of a ten-minute interval on 2
-- cores. Now a resource has a fixed place on a ring (`phase`, a fraction of the interval, drawn
-- once), and each kind has a cursor (`drift_cursors.through`) that the engines move along it:
-- a scheduler round reads the resources whose place the cursor passed and writes one row, the
-- cursor. No row per resource is written per check.
--
-- `instances.next_observe_at` is now set once, when a resource joins the schedule (it marks
-- that it has joined, through 0014's index); engines of the previous release still move it,
-- so during a rollout a resource may be checked by both (harmless: a check is a read).
-- Resources the previous release schedules after this migration join the new schedule when
-- the contract migrations run (migrations/contract/1023_drift_schedule_catch_up.sql).

-- drift_schedule: a resource's place on its kind's ring, in [0, 1) of the interval. A row
-- whose resource is deleted or pruned is removed by the round that finds it.
CREATE TABLE drift_schedule (
    resource_id uuid             PRIMARY KEY,
    kind        text             NOT NULL,
    phase       double precision NOT NULL CHECK (phase >= 0 AND phase < 1)
);
CREATE INDEX drift_schedule_kind_phase_idx ON drift_schedule (kind, phase);

-- drift_cursors: per kind, the time up to which the checks are enqueued. An engine moves it
-- under a row lock (FOR UPDATE SKIP LOCKED), so engines never enqueue the same check twice.
CREATE TABLE drift_cursors (
    kind    text        PRIMARY KEY,
    through timestamptz NOT NULL
);

-- Resources already scheduled join at a random place (only a read of instances: writes to it
-- go on meanwhile).
INSERT INTO drift_schedule (resource_id, kind, phase)
SELECT id, kind, random() FROM instances
WHERE deleted_at IS NULL AND next_observe_at IS NOT NULL;
