-- no-transaction
-- Live resources whose first drift check is not scheduled yet (the scheduler gives them one),
-- by kind. Like 0013's, the predicate keeps other queries from picking it.
-- Forward-only: never edit a released migration.
CREATE INDEX CONCURRENTLY IF NOT EXISTS instances_observe_unscheduled_idx
    ON instances (kind) WHERE deleted_at IS NULL AND next_observe_at IS NULL;
