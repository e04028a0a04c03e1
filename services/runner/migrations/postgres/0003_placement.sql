-- Several runners serving different sessions (runner.id set, PostgreSQL only).
-- Each runner's row: where it is reached, and its lease, renewed every few seconds. A
-- runner whose lease ran out is missing: its sessions wait, or move (shared storage).
CREATE TABLE runners (
    id             TEXT PRIMARY KEY,
    url            TEXT NOT NULL,
    docker_host    TEXT NOT NULL,
    capacity       BIGINT NOT NULL,
    shared_storage BOOLEAN NOT NULL,
    -- The process holding the row: a second process with the same id waits for the lease,
    -- unless it runs on the same host and holds the id's lock file there (the first one
    -- is dead then: a restart takes the row at once).
    instance       TEXT NOT NULL,
    host           TEXT NOT NULL,
    started_at     BIGINT NOT NULL,
    lease_until    TIMESTAMPTZ NOT NULL
);
-- The runner a session is placed on (NULL: never placed, a single runner's session), and
-- its fencing token: a new placement takes a greater one, written into the session's
-- mailbox, and a runner holding a smaller one can no longer write there.
ALTER TABLE sessions ADD COLUMN runner TEXT;
ALTER TABLE sessions ADD COLUMN fence BIGINT NOT NULL DEFAULT 0;
CREATE INDEX sessions_by_runner ON sessions (runner, created_at, id);
CREATE SEQUENCE session_fences START 1;
-- Messages for a session whose runner is missing (without shared storage), kept in order
-- until the runner returns and moves them into the session's mailbox.
CREATE TABLE handoff (
    n          BIGSERIAL PRIMARY KEY,
    session_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    request    BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (session_id, message_id)
);
