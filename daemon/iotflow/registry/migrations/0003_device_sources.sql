-- Downlinks: per device, the network server of its latest uplink (the input format) and
-- that server's own identifiers of the device (JSON object of strings), which a downlink
-- needs to be addressed. Independent of bindings: it describes the device, not a route.
CREATE TABLE device_sources (
    dev_eui {key} PRIMARY KEY NOT NULL,
    format {text} NOT NULL,
    source {json} NOT NULL,
    updated_at {time} NOT NULL
){sqlite: WITHOUT ROWID};
