-- Follow mode's bookkeeping (docs/follow-mode.md): one row per followed user of the
-- application's own table. The application's table gets no spicesync column; this is where
-- spicesync records what it applied. Created in both modes; it touches no application table.
CREATE TABLE IF NOT EXISTS spicesync_followed_users (
    user_id          text        PRIMARY KEY,
    status           text        NOT NULL CHECK (status IN ('synced', 'failed')),
    -- The row's version (the mapping's version column) or feed position last applied.
    applied_version  bigint,
    applied_position text,
    -- The per-user compare-and-set marker in SpiceDB after the last write.
    marker           bigint,
    zed_token        text,
    relationships    integer     NOT NULL DEFAULT 0,
    -- Error class and a message of opaque ids only, for `spicesync stuck`.
    last_error       text,
    error_message    text,
    failed_at        timestamptz,
    synced_at        timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS spicesync_followed_users_failed_idx
    ON spicesync_followed_users (failed_at) WHERE status = 'failed';
