-- no-transaction
-- 0011's index, replaced by 0013's and 0014's. No release ever relied on it for correctness,
-- only for speed, and no earlier release reads it: dropping it here is safe in a rollout.
-- Forward-only: never edit a released migration.
DROP INDEX CONCURRENTLY IF EXISTS instances_next_observe_idx;
