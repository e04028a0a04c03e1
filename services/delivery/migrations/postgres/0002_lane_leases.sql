-- Which delivery instance sends a lane's rows now, when several share one database: the
-- holder renews its lease while it sends, and a peer takes the lane once it expires
-- (milliseconds since the epoch, on the database's clock).
CREATE TABLE IF NOT EXISTS lane_leases (
    lane       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
