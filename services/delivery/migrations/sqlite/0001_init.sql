-- Delivery's tables as they stood before migrations: IF NOT EXISTS, so a file made then
-- (its missing columns added first, see ledger.rs) takes this migration as a no-op.
CREATE TABLE IF NOT EXISTS ledger (
    session_id          TEXT NOT NULL,
    out_seq             INTEGER NOT NULL,
    state               TEXT NOT NULL,      -- pending | delivered | failed
    attempts            INTEGER NOT NULL,
    kind                TEXT NOT NULL,
    destination         TEXT NOT NULL,
    platform_message_id TEXT,
    detail              TEXT,
    updated_at          INTEGER NOT NULL,
    reason              TEXT,               -- a failure in one plain sentence
    waits               INTEGER NOT NULL DEFAULT 0, -- rate-limit waits (not attempts)
    waiting_until       INTEGER,            -- while a rate-limit wait is in progress
    retryable           INTEGER NOT NULL DEFAULT 0, -- failed after transient errors only
    retried_at          INTEGER,            -- when an operator last sent it again
    PRIMARY KEY (session_id, out_seq)
);
CREATE TABLE IF NOT EXISTS conversation_messages (
    cursor       INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation TEXT NOT NULL,
    session_id   TEXT NOT NULL,
    out_seq      INTEGER NOT NULL,
    in_reply_to  INTEGER,
    kind         TEXT NOT NULL,
    text         TEXT NOT NULL,
    content      TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    UNIQUE (session_id, out_seq)
);
CREATE INDEX IF NOT EXISTS conversation_messages_by_conversation
    ON conversation_messages (conversation, cursor);
CREATE TABLE IF NOT EXISTS questions (
    question_id  TEXT PRIMARY KEY,
    session_id   TEXT NOT NULL,
    out_seq      INTEGER NOT NULL,
    conversation TEXT NOT NULL,
    options      TEXT NOT NULL,           -- JSON [{id, label}]
    expires_at   INTEGER NOT NULL,
    answer       TEXT,
    answered_by  TEXT,
    answered_at  INTEGER,
    agent        TEXT                     -- the asking agent (set for Discord questions)
);
