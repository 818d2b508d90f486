-- Shared request budgets (issue 19, docs/budgets.md): one token bucket per cloud-API limit,
-- shared by every engine. New tables only: the previous release never reads them, so this
-- expands without a contract step. Forward-only: never edit a released migration.
CREATE TABLE IF NOT EXISTS request_budgets (
    -- 'ec2/123456789012/eu-west-1/run_instances': adapter/account-or-endpoint/region/class
    key          text PRIMARY KEY,
    -- tokens per second now (AIMD moves it between max_rate / 20 and max_rate)
    rate         float8 NOT NULL CHECK (rate > 0),
    -- the configured rate
    max_rate     float8 NOT NULL CHECK (max_rate > 0),
    burst        float8 NOT NULL CHECK (burst >= 1),
    -- tokens at `at`; negative: tokens already promised to waiting units (reservations)
    tokens       float8 NOT NULL,
    at           timestamptz NOT NULL DEFAULT now(),
    -- the last multiplicative decrease (at most one per second)
    throttled_at timestamptz,
    throttles    bigint NOT NULL DEFAULT 0,
    waits        bigint NOT NULL DEFAULT 0
);

-- A token promised to a waiting unit: paid for when the unit was told to wait, spent when it
-- comes back at `slot` (on any engine), void if the key was throttled since `made_at` (the
-- promise was made at a rate the peer refused). Rows of units that never came back are
-- removed a few minutes after their slot.
CREATE TABLE IF NOT EXISTS request_budget_reservations (
    key     text NOT NULL,
    work_id bigint NOT NULL,
    slot    timestamptz NOT NULL,
    made_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (key, work_id)
);
