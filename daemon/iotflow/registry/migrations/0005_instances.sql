-- compatible-with: 4
-- Fleets (issue #17): the instances sharing this registry, each with the URL of its API and
-- a heartbeat, and the per-connection statistics each publishes with it, so that any
-- instance answers for the fleet. Additive only (docs/scale-out.md "Upgrades"): a version
-- that knows schema 4 keeps working on it, which `compatible-with` above records.
CREATE TABLE instances (
    id {key} PRIMARY KEY NOT NULL,  -- [mqtt] client_id, unique in a fleet
    api_url {text},                 -- where its peers reach its API; null: not reachable
    version {text} NOT NULL,        -- of iotflow
    schema_version {int} NOT NULL,  -- the newest migration it knows
    started_at {time} NOT NULL,
    seen_at {time} NOT NULL         -- its last heartbeat
);

CREATE TABLE instance_statistics (
    instance_id {key} NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    connection_id {key} NOT NULL,   -- no foreign key: a deleted connection's row is replaced
    document {json} NOT NULL,       -- the worker's statistics, as the API shows them
    PRIMARY KEY (instance_id, connection_id)
){sqlite: WITHOUT ROWID};

-- For each schema version, the oldest schema version whose code still works on it: an
-- instance of an older version starts on a newer registry when its own version is at least
-- that (a rolling upgrade), and refuses otherwise.
CREATE TABLE schema_compatibility (
    version {int} PRIMARY KEY NOT NULL,
    oldest_reader {int} NOT NULL
);
