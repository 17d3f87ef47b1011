-- The benchmark's follow-mode application: a users table of the application's own shape, in a
-- schema of its own, written by the application alone (spicesync only reads the mapped columns).
CREATE SCHEMA IF NOT EXISTS bench_follow;

CREATE TABLE IF NOT EXISTS bench_follow.accounts (
    account_id  uuid        PRIMARY KEY,
    email       text        NOT NULL UNIQUE,
    full_name   text        NOT NULL,
    team_id     text        NOT NULL,
    is_admin    boolean     NOT NULL DEFAULT false,
    row_version bigint      NOT NULL DEFAULT 1,
    -- When the application's transaction began: the benchmark's time-to-row.
    created_at  timestamptz NOT NULL DEFAULT now()
);
