-- no-transaction
-- The drift scheduler's index on when a check is due, for due resources only. Its predicate
-- names next_observe_at so that no other query on instances can pick it: 0011's index
-- (predicate `deleted_at IS NULL` alone) was chosen by the API's batched name probe in a plan
-- made while the table was empty, which then read every live resource per Create (measured:
-- 1,400 Creates/s instead of 5,500 in `setpoint bench api`). Built without blocking writes.
-- Forward-only: never edit a released migration.
CREATE INDEX CONCURRENTLY IF NOT EXISTS instances_observe_due_idx
    ON instances (next_observe_at) WHERE deleted_at IS NULL AND next_observe_at IS NOT NULL;
