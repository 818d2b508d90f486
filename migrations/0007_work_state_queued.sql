-- no-transaction
-- A unit state for engines of this release and later (issue 17): `queued` means what `pending`
-- means, but engines of the release before it do not claim it. Those engines claim any due
-- `pending` unit and park one whose kind they have no handler for; a unit this release
-- enqueues (a step of a new kind, a new unit format) must not reach them during a rollout.
-- From this release on, engines write `queued` wherever they wrote `pending`, and claim both.
-- Forward-only: never edit a released migration. (A value added here cannot be used in the
-- same transaction, hence a migration of its own.)
ALTER TYPE work_state ADD VALUE IF NOT EXISTS 'queued';
