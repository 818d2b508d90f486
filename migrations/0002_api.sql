-- The gRPC API (issue 3): bearer tokens, instance life cycle, change notifications.
-- Forward-only: never edit a released migration.

-- api_tokens: bearer tokens, stored as sha256 of the token text (the token itself is shown
-- once, by `setpoint tokens create`, and never stored).
CREATE TABLE api_tokens (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    token_hash  bytea       NOT NULL,
    tenant      text        NOT NULL,
    admin       boolean     NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,
    revoked_at  timestamptz,
    CONSTRAINT api_tokens_hash_key UNIQUE (token_hash),
    CONSTRAINT api_tokens_hash_len CHECK (length(token_hash) = 32)
);

-- The operation an instance is in (create, update, delete), kept while its chain runs and while
-- a unit of it is parked, so that an operator's retry restores the right status.
ALTER TABLE instances ADD COLUMN operation text;

-- A deleted instance stays as a tombstone (deleted_at set) for Watch and history; its name is
-- free again.
ALTER TABLE instances DROP CONSTRAINT instances_tenant_name_key;
CREATE UNIQUE INDEX instances_tenant_name_live_key ON instances (tenant, name) WHERE deleted_at IS NULL;

-- The instance life cycle, in one place. The API writes `operation` and sets
-- `has_active_work`; the worker runtime clears `has_active_work` when a chain ends (no unit
-- pending or running) and sets it again when an operator retries a parked unit. This trigger
-- turns those facts into `status`:
--
--   operation set with active work (API create/update/delete)  -> CREATING / UPDATING / DELETING
--   chain ends, a unit of the instance is parked               -> FAILED (operation kept)
--   FAILED, operator retries the parked unit                   -> CREATING / UPDATING / DELETING
--   chain ends, nothing parked, operation delete               -> DELETED, deleted_at = now()
--   chain ends, nothing parked, operation create or update     -> READY,
--                                                                 observed_generation = generation
CREATE FUNCTION setpoint_instance_status() RETURNS trigger LANGUAGE plpgsql AS $$
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
    ELSIF ended THEN
        IF EXISTS (SELECT 1 FROM work w WHERE w.resource_id = NEW.id AND w.state = 'parked') THEN
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

CREATE TRIGGER instances_status BEFORE INSERT OR UPDATE ON instances
    FOR EACH ROW EXECUTE FUNCTION setpoint_instance_status();

-- Watch: every change of an instance notifies `setpoint_instances` with the instance id.
-- (NOTIFY is delivered at commit; identical payloads in one transaction fold into one.)
CREATE FUNCTION setpoint_instance_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('setpoint_instances', NEW.id::text);
    RETURN NULL;
END $$;

CREATE TRIGGER instances_notify AFTER INSERT OR UPDATE ON instances
    FOR EACH ROW EXECUTE FUNCTION setpoint_instance_notify();
