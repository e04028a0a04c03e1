-- A page of the session list reads its rows in index order instead of sorting them all:
-- one index per order the console asks for (ties by id, the agent filter read from the
-- index without visiting the table).
CREATE INDEX IF NOT EXISTS sessions_by_recent ON sessions (last_activity DESC, id, agent);
CREATE INDEX IF NOT EXISTS sessions_by_oldest ON sessions (last_activity, id, agent);
CREATE INDEX IF NOT EXISTS sessions_by_creation ON sessions (created_at, id, agent);
