-- no-transaction
-- An enqueue places a tenant's new unit after the tenant's last unit of the same kind and
-- lane (issue 19): one backward probe of this index per tenant, kind and lane. Units without
-- a tenant are placed as one tenant (''). Built without blocking writes. Forward-only.
CREATE INDEX CONCURRENTLY IF NOT EXISTS work_tenant_fair_idx
    ON work ((coalesce(tenant, '')), kind, lane, fair_at)
    WHERE state IN ('pending', 'queued');
