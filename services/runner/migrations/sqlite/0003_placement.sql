-- Placement columns, as on PostgreSQL. Several runners need PostgreSQL, so on SQLite they
-- stay NULL and 0: every session belongs to the one runner.
ALTER TABLE sessions ADD COLUMN runner TEXT;
ALTER TABLE sessions ADD COLUMN fence INTEGER NOT NULL DEFAULT 0;
