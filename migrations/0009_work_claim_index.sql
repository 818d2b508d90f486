-- no-transaction
-- The kind-routed claim (issue 17) reads due units kind by kind, so that units of a kind this
-- engine does not serve (or that no engine serves) never lie in the way of the ones it does.
-- Built without blocking writes: the work table must stay writable during a rollout (one
-- statement per file: PostgreSQL runs several statements of one query as one transaction).
-- Forward-only: never edit a released migration.
CREATE INDEX CONCURRENTLY IF NOT EXISTS work_claim_idx ON work (kind, run_at, id)
    WHERE state IN ('pending', 'queued');
