-- The runner's tables as they stood before migrations: IF NOT EXISTS, so a file made then
-- (even one from before the daily table) takes this migration as a no-op or an addition.
CREATE TABLE IF NOT EXISTS sessions (
    id               TEXT PRIMARY KEY,
    agent            TEXT NOT NULL,
    conversation_key TEXT NOT NULL,
    created_at       INTEGER NOT NULL,
    last_activity    INTEGER NOT NULL,
    UNIQUE (agent, conversation_key)
);
CREATE TABLE IF NOT EXISTS model_usage (
    session_id    TEXT PRIMARY KEY,
    agent         TEXT NOT NULL,
    requests      INTEGER NOT NULL,
    input_tokens  INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS model_usage_by_agent ON model_usage (agent);
CREATE TABLE IF NOT EXISTS model_usage_daily (
    agent         TEXT NOT NULL,
    day           TEXT NOT NULL, -- UTC, 'YYYY-MM-DD': sorts as text
    requests      INTEGER NOT NULL,
    input_tokens  INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    PRIMARY KEY (agent, day)
);
