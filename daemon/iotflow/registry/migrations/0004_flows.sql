-- Flows (issue #13): `document` is Flow.document(), the product's shape. Which connections
-- a flow names is kept apart too, so that deleting a connection finds its flows by index.
-- No foreign key to connections: a provisioned connection removed from the config file
-- leaves API flows naming it, which then route nothing to it (docs/flows.md).
CREATE TABLE flows (
    id {key} PRIMARY KEY NOT NULL,
    document {json} NOT NULL,
    provisioned {bool} NOT NULL DEFAULT {false}{sqlite: CHECK (provisioned IN (0, 1))},
    created_at {time} NOT NULL,
    updated_at {time} NOT NULL
);

CREATE TABLE flow_connections (
    flow_id {key} NOT NULL REFERENCES flows (id) ON DELETE CASCADE,
    connection_id {key} NOT NULL,
    PRIMARY KEY (flow_id, connection_id)
){sqlite: WITHOUT ROWID};

CREATE INDEX flow_connections_by_connection ON flow_connections (connection_id, flow_id);
