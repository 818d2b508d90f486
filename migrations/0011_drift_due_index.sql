-- no-transaction
-- The drift scheduler takes the live resources whose check is due (issue 16): one index
-- descent per round, whatever the number of resources. Built without blocking writes.
-- Forward-only: never edit a released migration.
CREATE INDEX CONCURRENTLY IF NOT EXISTS instances_next_observe_idx
    ON instances (next_observe_at) WHERE deleted_at IS NULL;
