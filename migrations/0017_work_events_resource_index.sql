-- no-transaction
-- A resource's units, newest first, in one index range (see 0013). Small: only `enqueued`
-- events of units with a resource are in it. Built without blocking writes.
-- Forward-only: never edit a released migration.
CREATE INDEX CONCURRENTLY IF NOT EXISTS work_events_resource_idx
    ON work_events (resource_id, work_id DESC) WHERE resource_id IS NOT NULL;
