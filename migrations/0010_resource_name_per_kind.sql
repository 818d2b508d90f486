-- no-transaction
-- Names are unique per tenant and kind among live resources (issue 18). Built without
-- blocking writes. Forward-only: never edit a released migration.
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS instances_tenant_kind_name_live_key
    ON instances (tenant, kind, name) WHERE deleted_at IS NULL;
