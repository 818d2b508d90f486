-- no-transaction
-- The drift scheduler takes the ready resources whose check is due (issue 16). Built without
-- blocking writes. Forward-only: never edit a released migration.
CREATE INDEX CONCURRENTLY IF NOT EXISTS instances_next_observe_idx
    ON instances (next_observe_at) WHERE deleted_at IS NULL AND next_observe_at IS NOT NULL;
