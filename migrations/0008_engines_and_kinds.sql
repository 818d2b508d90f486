-- Engines register themselves and claim only the kinds they serve; resources of any kind
-- (issues 17 and 18). Forward-only: never edit a released migration.
--
-- This is an *expand* migration: engines of the previous release keep working on the schema
-- it leaves (they ignore the new columns and tables). What they still need and the new
-- release does not (the unique index on instances (tenant, name)) is dropped by the contract
-- migrations in migrations/contract/, which `setpoint migrate --contract` applies once no
-- engine of the previous release runs any more.

-- engines: every engine process of this release, with what it serves. A unit whose kind no
-- live engine serves waits (visibly) instead of parking; the API refuses a kind or a region
-- that no live engine serves.
CREATE TABLE engines (
    id             text        PRIMARY KEY,
    version        text        NOT NULL,
    -- work kinds it claims
    kinds          text[]      NOT NULL DEFAULT '{}',
    -- resource kinds it declares (their chains' steps are among `kinds`)
    resource_kinds text[]      NOT NULL DEFAULT '{}',
    regions        text[]      NOT NULL DEFAULT '{}',
    started_at     timestamptz NOT NULL DEFAULT now(),
    heartbeat_at   timestamptz NOT NULL DEFAULT now(),
    stopped_at     timestamptz
);

-- A leased unit may now be `queued` as well as `pending` (migration 0007). NOT VALID, then
-- VALIDATE: the check of existing rows does not block writes.
ALTER TABLE work DROP CONSTRAINT work_lease;
ALTER TABLE work ADD CONSTRAINT work_lease CHECK (
    state <> 'running'
    AND (lease_owner IS NULL) = (lease_expires_at IS NULL)
    AND (state IN ('pending', 'queued') OR lease_owner IS NULL)
) NOT VALID;
ALTER TABLE work VALIDATE CONSTRAINT work_lease;

-- A unit that does not hold its resource (a notification after a change, a drift check) runs
-- beside it: the resource's status and its changes do not wait for it.
ALTER TABLE work ADD COLUMN holds_resource boolean NOT NULL DEFAULT true;

-- instances becomes the table of resources of every kind; existing rows are KVX instances.
-- `observed` keeps each chain step's visible output under the step's output name, next to
-- `conditions`; `secrets` holds the secret outputs, encrypted by the engine (never readable
-- in the database); `spec_version` is the version of the kind's schema the spec was written
-- for; `next_observe_at` is when the drift check of a ready resource is next due.
ALTER TABLE instances ADD COLUMN kind text NOT NULL DEFAULT 'kvx.instance';
ALTER TABLE instances ADD COLUMN secrets bytea;
ALTER TABLE instances ADD COLUMN spec_version integer NOT NULL DEFAULT 1;
ALTER TABLE instances ADD COLUMN next_observe_at timestamptz;

-- The status trigger counts only parked units that hold their resource: a parked
-- notification leaves its resource READY (or DELETED), with a condition saying so.
CREATE OR REPLACE FUNCTION setpoint_instance_status() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    started boolean;
    ended   boolean;
BEGIN
    IF TG_OP = 'INSERT' THEN
        started := NEW.has_active_work;
        ended := false;
    ELSE
        started := NEW.has_active_work AND (NOT OLD.has_active_work
                                            OR NEW.operation IS DISTINCT FROM OLD.operation);
        ended := OLD.has_active_work AND NOT NEW.has_active_work;
    END IF;
    IF started AND NEW.operation IS NOT NULL THEN
        NEW.status := CASE NEW.operation WHEN 'create' THEN 'CREATING'
                                         WHEN 'update' THEN 'UPDATING'
                                         WHEN 'delete' THEN 'DELETING'
                                         ELSE NEW.status END;
    ELSIF started AND TG_OP = 'UPDATE' AND OLD.status = 'FAILED' THEN
        -- No operation: the retried unit is a check of a READY instance.
        NEW.status := 'READY';
    ELSIF ended THEN
        IF EXISTS (SELECT 1 FROM work w WHERE w.resource_id = NEW.id AND w.state = 'parked'
                                          AND w.holds_resource) THEN
            NEW.status := 'FAILED';
        ELSIF NEW.operation = 'delete' THEN
            NEW.status := 'DELETED';
            NEW.deleted_at := coalesce(NEW.deleted_at, now());
            NEW.operation := NULL;
        ELSE
            NEW.status := 'READY';
            NEW.observed_generation := NEW.generation;
            NEW.operation := NULL;
        END IF;
    END IF;
    RETURN NEW;
END $$;
