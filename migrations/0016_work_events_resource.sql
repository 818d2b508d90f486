-- A resource's history (ListResourceHistory, the console's timeline; issue 20): the `enqueued`
-- event of a unit names the unit's resource and its kind, so that a resource's units are found
-- and named after they have left the work table. Only that event carries them (NULL on the
-- others). Engines of the previous release write NULL: their units show in a timeline only
-- while unfinished.
-- Forward-only: never edit a released migration.
ALTER TABLE work_events ADD COLUMN resource_id uuid, ADD COLUMN kind text;
