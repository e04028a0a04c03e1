-- The scheduler's tables as they stood before migrations: IF NOT EXISTS, so a file made
-- then takes this migration as a no-op.
CREATE TABLE IF NOT EXISTS tasks (
    id            TEXT PRIMARY KEY,
    series_id     TEXT NOT NULL,
    session_id    TEXT NOT NULL,
    agent         TEXT NOT NULL,
    name          TEXT NOT NULL,
    prompt        TEXT NOT NULL,
    schedule_kind TEXT NOT NULL,          -- cron | interval | once
    cron          TEXT NOT NULL DEFAULT '',
    interval_secs INTEGER NOT NULL DEFAULT 0,
    at            TEXT NOT NULL DEFAULT '',
    timezone      TEXT NOT NULL,
    catch_up      TEXT NOT NULL,          -- catch_up | skip
    reply_to      TEXT NOT NULL,          -- destination JSON
    state         TEXT NOT NULL,          -- active | paused | cancelled | completed
    next_run      INTEGER,
    last_run      INTEGER,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_by_session ON tasks (session_id);
CREATE INDEX IF NOT EXISTS tasks_due ON tasks (next_run) WHERE state = 'active';
CREATE TABLE IF NOT EXISTS runs (
    task_id      TEXT NOT NULL,
    series_id    TEXT NOT NULL,
    scheduled_at INTEGER NOT NULL,
    fired_at     INTEGER NOT NULL,
    outcome      TEXT NOT NULL,           -- enqueued | skipped | failed
    detail       TEXT,
    message_id   TEXT,
    PRIMARY KEY (task_id, series_id, scheduled_at)
);
