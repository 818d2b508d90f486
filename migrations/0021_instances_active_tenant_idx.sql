-- no-transaction
-- The API's per-tenant quota on changes in flight (issue 19) counts a tenant's resources with
-- active work, up to the limit: one short index range per check, whatever the tenant's size.
-- Built without blocking writes. Forward-only: never edit a released migration.
CREATE INDEX CONCURRENTLY IF NOT EXISTS instances_active_tenant_idx
    ON instances (tenant) WHERE has_active_work;
