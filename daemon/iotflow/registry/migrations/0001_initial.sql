-- Connections, device bindings and event logs.
-- `document` is Connection.document(reveal=True): secrets are in clear, hence the SQLite
-- file's 0600. Identifiers sort in byte order in both databases, so ORDER BY agrees.
CREATE TABLE connections (
    id {key} PRIMARY KEY NOT NULL,
    document {json} NOT NULL,
    provisioned {bool} NOT NULL DEFAULT {false}{sqlite: CHECK (provisioned IN (0, 1))},
    created_at {time} NOT NULL,
    updated_at {time} NOT NULL
);

CREATE TABLE device_bindings (
    dev_eui {key} NOT NULL,
    connection_id {key} NOT NULL REFERENCES connections (id) ON DELETE CASCADE,
    PRIMARY KEY (dev_eui, connection_id)
){sqlite: WITHOUT ROWID};

-- Devices of a connection (API filter) and the cascade when a connection is deleted.
CREATE INDEX device_bindings_by_connection ON device_bindings (connection_id, dev_eui);

-- Event ids are never reused, even after a connection's events are deleted.
CREATE TABLE events (
    id {sqlite:INTEGER PRIMARY KEY AUTOINCREMENT}{postgresql:bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY},
    connection_id {key} NOT NULL REFERENCES connections (id) ON DELETE CASCADE,
    time {time} NOT NULL,
    kind {text} NOT NULL,
    data {json} NOT NULL
);

-- Newest first per connection: the event log page and the pruning on insert.
CREATE INDEX events_by_connection ON events (connection_id, id DESC);
