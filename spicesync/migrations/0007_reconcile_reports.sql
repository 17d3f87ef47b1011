-- Follow mode's reconcile reports (docs/follow-mode.md): one row per run, JSON counts and samples
-- of opaque ids, never a row's values. Owned mode keeps its reports in `reconcile_reports`
-- (0003, which also changes spicesync's own `users` table and so never runs in follow mode);
-- this migration touches no application table and runs in both modes.
CREATE TABLE IF NOT EXISTS spicesync_reconcile_reports (
    workflow_id  text        NOT NULL,
    run_id       text        NOT NULL,
    dry_run      boolean     NOT NULL,
    finished_at  timestamptz NOT NULL DEFAULT now(),
    report       jsonb       NOT NULL,
    PRIMARY KEY (workflow_id, run_id)
);
