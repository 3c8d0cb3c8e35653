-- Alarms: uplinks counted per connection and minute (shared by every instance), and the
-- raised/cleared state of each alarm, so that a restart neither forgets nor repeats a raise.
CREATE TABLE uplink_counts (
    connection_id text COLLATE "C" NOT NULL REFERENCES connections (id) ON DELETE CASCADE,
    minute bigint NOT NULL,  -- minutes since the epoch
    count bigint NOT NULL,
    PRIMARY KEY (connection_id, minute)
);

CREATE TABLE alarm_states (
    connection_id text COLLATE "C" NOT NULL REFERENCES connections (id) ON DELETE CASCADE,
    alarm integer NOT NULL,
    fingerprint text NOT NULL,
    active boolean NOT NULL,
    since timestamptz NOT NULL,
    rate double precision NOT NULL,
    window_start timestamptz,
    window_end timestamptz,
    PRIMARY KEY (connection_id, alarm)
);
