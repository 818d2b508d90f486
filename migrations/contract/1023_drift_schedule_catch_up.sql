-- Contract of 0023: applied by `setpoint migrate --contract` once no engine of the release
-- before it runs. Forward-only: never edit a released migration.

-- Resources that an engine of the previous release scheduled after 0023 ran join the new
-- schedule (until now only that release checked them).
INSERT INTO drift_schedule (resource_id, kind, phase)
SELECT id, kind, random() FROM instances
WHERE deleted_at IS NULL AND next_observe_at IS NOT NULL
ON CONFLICT (resource_id) DO NOTHING;

-- Only the previous release's scheduler read when a check was next due.
DROP INDEX IF EXISTS instances_observe_due_idx;
