-- The runner's tables. Integers are BIGINT (milliseconds, token counts): they read as i64.
CREATE TABLE sessions (
    id               TEXT PRIMARY KEY,
    agent            TEXT NOT NULL,
    conversation_key TEXT NOT NULL,
    created_at       BIGINT NOT NULL,
    last_activity    BIGINT NOT NULL,
    UNIQUE (agent, conversation_key)
);
CREATE TABLE model_usage (
    session_id    TEXT PRIMARY KEY,
    agent         TEXT NOT NULL,
    requests      BIGINT NOT NULL,
    input_tokens  BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);
CREATE INDEX model_usage_by_agent ON model_usage (agent);
CREATE TABLE model_usage_daily (
    agent         TEXT NOT NULL,
    day           TEXT NOT NULL, -- UTC, 'YYYY-MM-DD': sorts as text
    requests      BIGINT NOT NULL,
    input_tokens  BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    PRIMARY KEY (agent, day)
);
