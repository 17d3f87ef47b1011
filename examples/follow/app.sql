-- The follow-mode demo's application table: the app's own shape, written by the app alone.
CREATE SCHEMA IF NOT EXISTS follow_demo;

CREATE TABLE IF NOT EXISTS follow_demo.accounts (
    account_id  bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email       text        NOT NULL UNIQUE,
    team_id     text,
    is_admin    boolean     NOT NULL DEFAULT false,
    squad       text,
    squad_role  text,
    row_version bigint      NOT NULL DEFAULT 1,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
