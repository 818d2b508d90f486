-- A claim no longer changes an indexed column, so PostgreSQL updates the row in place (a HOT
-- update: no new index entries, no unique checks). Before, every claim wrote three index
-- entries (primary key, token, lease) and cost about as much as the enqueue itself.
--
-- A running unit is now a pending unit with a lease: `state` stays 'pending' while
-- `lease_owner` and `lease_expires_at` are set; readers show it as running. 'running' stays in
-- the enum (PostgreSQL cannot drop enum values) but may no longer be written: the constraint
-- below makes an engine of an earlier version fail its claim instead of running a leased unit
-- a second time. Stop such engines before applying this migration.
ALTER TABLE work DROP CONSTRAINT work_lease;
UPDATE work SET state = 'pending' WHERE state = 'running';
ALTER TABLE work ADD CONSTRAINT work_lease CHECK (
    state <> 'running'
    AND (lease_owner IS NULL) = (lease_expires_at IS NULL)
    AND (state = 'pending' OR lease_owner IS NULL)
);

-- Expired leases are found by the claim's scan of work_pending_idx (a leased unit keeps its
-- place there), so the lease needs no index of its own, and an index on it would make every
-- claim and heartbeat a non-HOT update.
DROP INDEX work_lease_idx;

-- Room on every page for a second version of each row, so that claims and heartbeats find
-- space next to the row they update (a HOT update must stay on its page). Applies to pages
-- written from now on; `VACUUM FULL work` rewrites the existing ones.
ALTER TABLE work SET (fillfactor = 45);
