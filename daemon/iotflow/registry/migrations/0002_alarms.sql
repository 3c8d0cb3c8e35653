-- Alarms: uplinks counted per connection and minute (shared by every instance), and the
-- raised/cleared state of each alarm, so that a restart neither forgets nor repeats a raise.
CREATE TABLE uplink_counts (
    connection_id {key} NOT NULL REFERENCES connections (id) ON DELETE CASCADE,
    minute {bigint} NOT NULL,  -- minutes since the epoch
    count {bigint} NOT NULL,
    PRIMARY KEY (connection_id, minute)
){sqlite: WITHOUT ROWID};

CREATE TABLE alarm_states (
    connection_id {key} NOT NULL REFERENCES connections (id) ON DELETE CASCADE,
    alarm {int} NOT NULL,       -- index in the connection's alarms
    fingerprint {text} NOT NULL,    -- of the alarm's definition: an edited alarm starts clear
    active {bool} NOT NULL{sqlite: CHECK (active IN (0, 1))},
    since {time} NOT NULL,
    rate {real} NOT NULL,
    window_start {time},
    window_end {time},
    PRIMARY KEY (connection_id, alarm)
){sqlite: WITHOUT ROWID};
