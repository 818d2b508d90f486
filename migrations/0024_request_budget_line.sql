-- The line of units waiting to be let in to a request budget (issue 19, docs/budgets.md): a
-- unit at the first call of its attempt that finds the key's promises already a few seconds
-- long joins this line and sleeps; an engine's admission round hands the head of the line
-- promised tokens (request_budget_reservations) as the line of promises shortens, and makes
-- those units due at their slots. A new table only: the previous release never reads it, so
-- this expands without a contract step. Forward-only: never edit a released migration.
CREATE TABLE IF NOT EXISTS request_budget_line (
    key       text NOT NULL,
    work_id   bigint NOT NULL,
    joined_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (key, work_id)
);

-- The rate a key had when the peer last throttled it: the rate climbs back fast to just under
-- it, then probes slowly (src/store/budgets.rs, `recovered_rate!`). Nullable, so the previous
-- release's inserts are unaffected.
ALTER TABLE request_budgets ADD COLUMN IF NOT EXISTS peak float8;
