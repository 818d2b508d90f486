-- A token may be limited to some kinds of resources: glob patterns of kind names (`dns.*`).
-- NULL: every kind. An engine of the previous release ignores the column, so during a rollout
-- a limited token is only limited by the engines of this release: create limited tokens
-- once the rollout is done.
ALTER TABLE api_tokens ADD COLUMN kinds text[];
