-- Connections, device bindings and event logs.
-- `document` is Connection.document(reveal=True): secrets are in clear.
-- Identifiers use the "C" collation so that ORDER BY agrees with SQLite (byte order),
-- whatever the database's locale.
CREATE TABLE connections (
    id text COLLATE "C" PRIMARY KEY,
    document jsonb NOT NULL,
    provisioned boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);

CREATE TABLE device_bindings (
    dev_eui text COLLATE "C" NOT NULL,
    connection_id text COLLATE "C" NOT NULL REFERENCES connections (id) ON DELETE CASCADE,
    PRIMARY KEY (dev_eui, connection_id)
);

-- Devices of a connection (API filter) and the cascade when a connection is deleted.
CREATE INDEX device_bindings_by_connection ON device_bindings (connection_id, dev_eui);

CREATE TABLE events (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    connection_id text COLLATE "C" NOT NULL REFERENCES connections (id) ON DELETE CASCADE,
    time timestamptz NOT NULL,
    kind text NOT NULL,
    data jsonb NOT NULL
);

-- Newest first per connection: the event log page and the pruning on insert.
CREATE INDEX events_by_connection ON events (connection_id, id DESC);
