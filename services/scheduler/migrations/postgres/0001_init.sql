-- The scheduler's tables. Integers are BIGINT (milliseconds, seconds): they read as i64.
CREATE TABLE tasks (
    id            TEXT PRIMARY KEY,
    series_id     TEXT NOT NULL,
    session_id    TEXT NOT NULL,
    agent         TEXT NOT NULL,
    name          TEXT NOT NULL,
    prompt        TEXT NOT NULL,
    schedule_kind TEXT NOT NULL,          -- cron | interval | once
    cron          TEXT NOT NULL DEFAULT '',
    interval_secs BIGINT NOT NULL DEFAULT 0,
    at            TEXT NOT NULL DEFAULT '',
    timezone      TEXT NOT NULL,
    catch_up      TEXT NOT NULL,          -- catch_up | skip
    reply_to      TEXT NOT NULL,          -- destination JSON
    state         TEXT NOT NULL,          -- active | paused | cancelled | completed
    next_run      BIGINT,
    last_run      BIGINT,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);
CREATE INDEX tasks_by_session ON tasks (session_id);
CREATE INDEX tasks_due ON tasks (next_run) WHERE state = 'active';
CREATE TABLE runs (
    task_id      TEXT NOT NULL,
    series_id    TEXT NOT NULL,
    scheduled_at BIGINT NOT NULL,
    fired_at     BIGINT NOT NULL,
    outcome      TEXT NOT NULL,           -- enqueued | skipped | failed
    detail       TEXT,
    message_id   TEXT,
    PRIMARY KEY (task_id, series_id, scheduled_at)
);
