-- Lanes and fairness in the claim (issue 19). `lane` orders the claim before anything else: 0
-- a user's change, 1 a drift check, 2 bulk work. `fair_at` is the unit's place among the
-- units of its lane: a tenant's units are spaced apart (see `work_enqueue`), so that one
-- tenant's burst lies behind another tenant's single change. Both have defaults that the
-- previous release never needs to write: its units are user changes placed at their insert
-- time (`now()` is stable, so existing rows take the time of this statement without a table
-- rewrite). Forward-only: never edit a released migration.
ALTER TABLE work ADD COLUMN lane smallint NOT NULL DEFAULT 0,
                 ADD COLUMN fair_at timestamptz NOT NULL DEFAULT now();
