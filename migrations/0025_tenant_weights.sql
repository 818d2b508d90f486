-- Tenants' weights in the fair claim (issue 19, docs/operations.md "Lanes and fairness"): an
-- enqueue places a tenant's units 1/weight seconds apart in their lane instead of one second,
-- so a tenant of weight 4 gets four turns for each turn of a tenant of weight 1. A tenant
-- without a row weighs 1. Held in the database, not in each engine's file, so that every
-- engine and API process places units alike. A new table: the previous release never reads
-- it (it places units without weights), so this expands without a contract step.
-- Forward-only: never edit a released migration.
CREATE TABLE IF NOT EXISTS tenant_weights (
    tenant     text PRIMARY KEY,
    weight     float8 NOT NULL CHECK (weight >= 0.01 AND weight <= 1000),
    updated_at timestamptz NOT NULL DEFAULT now()
);
