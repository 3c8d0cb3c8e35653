-- Alarms: uplinks counted per connection and minute (shared by every instance), and the
-- raised/cleared state of each alarm, so that a restart neither forgets nor repeats a raise.
CREATE TABLE uplink_counts (
    connection_id TEXT NOT NULL REFERENCES connections (id) ON DELETE CASCADE,
    minute INTEGER NOT NULL,  -- minutes since the epoch
    count INTEGER NOT NULL,
    PRIMARY KEY (connection_id, minute)
) WITHOUT ROWID;

CREATE TABLE alarm_states (
    connection_id TEXT NOT NULL REFERENCES connections (id) ON DELETE CASCADE,
    alarm INTEGER NOT NULL,       -- index in the connection's alarms
    fingerprint TEXT NOT NULL,    -- of the alarm's definition: an edited alarm starts clear
    active INTEGER NOT NULL CHECK (active IN (0, 1)),
    since TEXT NOT NULL,
    rate REAL NOT NULL,
    window_start TEXT,
    window_end TEXT,
    PRIMARY KEY (connection_id, alarm)
) WITHOUT ROWID;
