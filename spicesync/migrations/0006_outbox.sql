-- The transactional outbox (docs/follow-mode.md). The application inserts the changed user's
-- id (and version, if it has one) in the same transaction as its own write:
--     INSERT INTO spicesync_outbox (user_id, version) VALUES ($1, $2);
-- `spicesync relay outbox` delivers each row to the user's workflow and deletes it only once
-- Temporal has accepted it. The trigger wakes relays at commit (LISTEN spicesync_outbox);
-- they also poll, so a lost notification only delays.
CREATE TABLE IF NOT EXISTS spicesync_outbox (
    seq        bigserial   PRIMARY KEY,
    user_id    text        NOT NULL CHECK (length(user_id) BETWEEN 1 AND 128),
    version    bigint,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION spicesync_outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('spicesync_outbox', '');
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS spicesync_outbox_notify ON spicesync_outbox;
CREATE TRIGGER spicesync_outbox_notify
    AFTER INSERT ON spicesync_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION spicesync_outbox_notify();
