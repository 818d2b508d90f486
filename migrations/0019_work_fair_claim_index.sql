-- no-transaction
-- The claim reads due units kind by kind in (lane, fair_at, id) order (issue 19). Built
-- without blocking writes; the previous claim's index (work_claim_idx) stays until the
-- contract migration of the next release, for the engines of this one's predecessor.
-- Forward-only: never edit a released migration.
CREATE INDEX CONCURRENTLY IF NOT EXISTS work_fair_claim_idx ON work (kind, lane, fair_at, id)
    WHERE state IN ('pending', 'queued');
