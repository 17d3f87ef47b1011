-- Lifecycle events: every row carries the version of the last event applied to it, the event
-- that inserted it, and a deleted user leaves a tombstone with the version of its deletion, so
-- an older event delivered late (a retried create after a delete) is recognised as stale.
ALTER TABLE users ADD COLUMN version bigint NOT NULL DEFAULT 1 CHECK (version > 0);
ALTER TABLE users ADD COLUMN created_by_event text;
ALTER TABLE users ALTER COLUMN created_by_run DROP NOT NULL;

CREATE TABLE user_tombstones (
    id          uuid        PRIMARY KEY,
    version     bigint      NOT NULL CHECK (version > 0),
    deleted_at  timestamptz NOT NULL DEFAULT now()
);
