-- Connections, device bindings and event logs.
-- `document` is Connection.document(reveal=True): secrets are in clear, hence the file's 0600.
CREATE TABLE connections (
    id TEXT PRIMARY KEY NOT NULL,
    document TEXT NOT NULL,
    provisioned INTEGER NOT NULL DEFAULT 0 CHECK (provisioned IN (0, 1)),
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

CREATE TABLE device_bindings (
    dev_eui TEXT NOT NULL,
    connection_id TEXT NOT NULL REFERENCES connections (id) ON DELETE CASCADE,
    PRIMARY KEY (dev_eui, connection_id)
) WITHOUT ROWID;

-- Devices of a connection (API filter) and the cascade when a connection is deleted.
CREATE INDEX device_bindings_by_connection ON device_bindings (connection_id, dev_eui);

-- AUTOINCREMENT: event ids are never reused, even after a connection's events are deleted.
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    connection_id TEXT NOT NULL REFERENCES connections (id) ON DELETE CASCADE,
    time TEXT NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL
);

-- Newest first per connection: the event log page and the pruning on insert.
CREATE INDEX events_by_connection ON events (connection_id, id DESC);
