-- An instance whose parked unit belongs to no operation (a drift check, `kvx.observe`, or its
-- heal) showed FAILED while an operator's retry of that unit ran, and only went back to READY
-- when it ended. Such units run on READY instances, which keep their status while they run; a
-- retry now restores READY at once, as a retry of an operation's unit restores that operation's
-- status. Forward-only: the function is replaced, the trigger stays.
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
