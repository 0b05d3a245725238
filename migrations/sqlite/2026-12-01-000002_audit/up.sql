-- The append-only, hash-chained audit log (SQLite).
-- `seq` is assigned by the store (last seq + 1) while writers are serialized; as
-- `INTEGER PRIMARY KEY` it is the rowid, so ordering by seq is the table order.

CREATE TABLE audit_events (
    seq               INTEGER NOT NULL PRIMARY KEY,
    id                TEXT    NOT NULL,
    timestamp         BIGINT  NOT NULL,
    actor             TEXT    NOT NULL,
    actor_id          TEXT,
    event_type        TEXT    NOT NULL,
    resource_type     TEXT    NOT NULL,
    resource_id       TEXT,
    change_request_id TEXT,
    request_id        TEXT,
    payload           TEXT    NOT NULL,
    prev_hash         TEXT    NOT NULL,
    hash              TEXT    NOT NULL,
    CONSTRAINT audit_events_id_key UNIQUE (id)
);

-- One index per filter of GET /audit, each ending in seq for the keyset order.
CREATE INDEX audit_events_actor_id_idx ON audit_events (actor_id, seq);
CREATE INDEX audit_events_change_request_id_idx ON audit_events (change_request_id, seq);
CREATE INDEX audit_events_resource_idx ON audit_events (resource_type, resource_id, seq);
CREATE INDEX audit_events_event_type_idx ON audit_events (event_type, seq);
CREATE INDEX audit_events_timestamp_idx ON audit_events (timestamp);
