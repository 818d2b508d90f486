-- The core tables of setpoint (DESIGN §3). Forward-only: never edit a released migration.

-- instances: the user-facing resource, desired spec plus what the workers observed.
CREATE TABLE instances (
    id                  uuid PRIMARY KEY,
    tenant              text        NOT NULL,
    name                text        NOT NULL,
    spec                jsonb       NOT NULL,
    generation          bigint      NOT NULL DEFAULT 1,
    observed            jsonb       NOT NULL DEFAULT '{}'::jsonb,
    observed_generation bigint      NOT NULL DEFAULT 0,
    status              text        NOT NULL DEFAULT 'pending',
    conditions          jsonb       NOT NULL DEFAULT '[]'::jsonb,
    has_active_work     boolean     NOT NULL DEFAULT false,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    deleted_at          timestamptz,
    CONSTRAINT instances_tenant_name_key UNIQUE (tenant, name)
);
CREATE INDEX instances_tenant_created_idx ON instances (tenant, created_at, id);

-- work: one row per unit still to do. A finished unit leaves this table; its history stays in
-- work_events. pending -> running (leased) -> deleted on success; -> pending (backoff) on a
-- transient failure; -> parked on a permanent one, until an operator retries or cancels it.
CREATE TYPE work_state AS ENUM ('pending', 'running', 'parked');

CREATE TABLE work (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind             text        NOT NULL,
    spec             jsonb       NOT NULL,
    token            text        NOT NULL,
    resource_id      uuid,
    tenant           text,
    parent_id        bigint,
    state            work_state  NOT NULL DEFAULT 'pending',
    attempt          integer     NOT NULL DEFAULT 0,
    max_attempts     integer     NOT NULL DEFAULT 20,
    run_at           timestamptz NOT NULL DEFAULT now(),
    lease_owner      text,
    lease_expires_at timestamptz,
    last_error       text,
    last_error_class text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT work_token_key UNIQUE (token),
    CONSTRAINT work_token_format CHECK (token ~ '^[A-Za-z0-9._-]{1,64}$'),
    CONSTRAINT work_kind_format CHECK (length(kind) BETWEEN 1 AND 128),
    CONSTRAINT work_attempts CHECK (max_attempts >= 1 AND attempt >= 0),
    CONSTRAINT work_lease CHECK (state <> 'running' OR (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL))
);
-- The claim scans pending units in run_at order, and expired leases (rescue).
CREATE INDEX work_pending_idx ON work (run_at, id) WHERE state = 'pending';
-- Leases are set only while running. The predicate is on the lease, not on the state, so the
-- planner never prefers this index for fenced statements that look rows up by id.
CREATE INDEX work_lease_idx ON work (lease_expires_at) WHERE lease_expires_at IS NOT NULL;
CREATE INDEX work_resource_idx ON work (resource_id) WHERE resource_id IS NOT NULL;
CREATE INDEX work_parked_idx ON work (id) WHERE state = 'parked';
-- A queue table churns: vacuum it early so dead tuples do not slow the claim.
ALTER TABLE work SET (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 1000,
                      autovacuum_vacuum_cost_delay = 0, fillfactor = 80);

-- work_events: append-only history of every unit; outlives the work row.
CREATE TABLE work_events (
    id          bigint GENERATED ALWAYS AS IDENTITY,
    work_id     bigint      NOT NULL,
    token       text        NOT NULL,
    event       text        NOT NULL,
    attempt     integer,
    worker      text,
    error_class text,
    message     text,
    detail      jsonb,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX work_events_work_idx ON work_events (work_id, id);
-- Looking a finished unit up by token needs only its first event.
CREATE INDEX work_events_token_idx ON work_events (token) WHERE event = 'enqueued';
CREATE INDEX work_events_at_idx ON work_events USING brin (at);

-- api_requests: client request ids of mutating RPCs, so a replay returns the first answer.
CREATE TABLE api_requests (
    tenant       text        NOT NULL,
    request_id   text        NOT NULL,
    method       text        NOT NULL,
    body_hash    bytea       NOT NULL,
    response     bytea,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, request_id)
);

-- side_effects: at-most-once records for adapter side effects with no idempotent path
-- (plain SMTP). Written outside the completion transaction, before the side effect.
CREATE TABLE side_effects (
    key         text PRIMARY KEY,
    work_id     bigint,
    token       text,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    result      jsonb
);
