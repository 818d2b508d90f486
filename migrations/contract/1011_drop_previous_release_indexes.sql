-- Contract of 0007-0011: applied by `setpoint migrate --contract` once no engine of the
-- release before them runs (they insert with ON CONFLICT (tenant, name), which needs it).
-- Until then a tenant's resources of two kinds cannot share a name.
DROP INDEX IF EXISTS instances_tenant_name_live_key;

-- The claim of the previous release scanned this index; the kind-routed claim does not.
DROP INDEX IF EXISTS work_pending_idx;

-- Units the previous release left pending are queued like every other (nothing of that
-- release claims any more).
UPDATE work SET state = 'queued' WHERE state = 'pending';
