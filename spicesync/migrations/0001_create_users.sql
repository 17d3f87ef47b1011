-- The App DB's users. spicesync owns the row's lifecycle: the workflow run that inserts it is
-- recorded so compensation deletes only a row that run created.
CREATE TABLE users (
    id              uuid        PRIMARY KEY,
    email           text        NOT NULL CHECK (length(email) BETWEEN 3 AND 254),
    name            text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    org_id          text        NOT NULL CHECK (org_id ~ '^[A-Za-z0-9_-]{1,128}$'),
    role            text        NOT NULL CHECK (role IN ('member', 'admin')),
    sync_status     text        NOT NULL DEFAULT 'pending' CHECK (sync_status IN ('pending', 'synced')),
    zed_token       text,
    created_by_run  text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    synced_at       timestamptz
);

-- Email is unique regardless of case: Alice@x.org and alice@x.org are the same person.
CREATE UNIQUE INDEX users_email_lower_key ON users (lower(email));
CREATE INDEX users_org_id_idx ON users (org_id);
