-- The CDC relay's bookkeeping (docs/follow-mode.md#change-data-capture): one row per logical
-- replication slot the relay has created. A slot missing at start while its row is here was
-- lost (dropped, or invalidated for retaining too much WAL): the relay creates it again and
-- starts a follow-mode reconcile for what happened in between. Touches no application table.
CREATE TABLE IF NOT EXISTS spicesync_cdc_slots (
    slot_name    text        PRIMARY KEY,
    publication  text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    times_lost   integer     NOT NULL DEFAULT 0,
    -- A loss whose reconcile Temporal has not accepted yet (the relay died in between).
    reconcile_due boolean    NOT NULL DEFAULT false,
    last_lost_at timestamptz
);
