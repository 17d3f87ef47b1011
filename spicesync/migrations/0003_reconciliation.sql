-- Reconciliation and backfill.
--
-- permissions_written_at: when spicesync last wrote this user's relationships to SpiceDB. A
-- live sync sets it under the row's lock in the same breath as its SpiceDB write, so a
-- backfill, which takes the same locks, never overwrites what a live sync has written with the
-- older membership it read (see activities/backfill.py).
ALTER TABLE users ADD COLUMN permissions_written_at timestamptz;
UPDATE users SET permissions_written_at = synced_at WHERE synced_at IS NOT NULL;

-- Backfill candidates: rows spicesync never wrote to SpiceDB, in keyset order.
CREATE INDEX users_backfill_idx ON users (id) WHERE permissions_written_at IS NULL;

-- One row per reconcile run: counts and samples of opaque ids, never a name or an email.
CREATE TABLE reconcile_reports (
    workflow_id  text        NOT NULL,
    run_id       text        NOT NULL,
    dry_run      boolean     NOT NULL,
    finished_at  timestamptz NOT NULL DEFAULT now(),
    report       jsonb       NOT NULL,
    PRIMARY KEY (workflow_id, run_id)
);
