-- Background jobs (claimed under a lease) and the asset inventory (SQLite).

CREATE TABLE jobs (
    id            TEXT    NOT NULL PRIMARY KEY,
    kind          TEXT    NOT NULL CHECK (kind IN ('discovery', 'execution', 'rollback')),
    status        TEXT    NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed')),
    resource_type TEXT    NOT NULL,
    resource_id   TEXT    NOT NULL,
    progress      TEXT    NOT NULL,
    result        TEXT    NOT NULL,
    error         TEXT,
    created_at    BIGINT  NOT NULL,
    started_at    BIGINT,
    finished_at   BIGINT,
    lease_owner   TEXT,
    lease_until   BIGINT,
    attempts      INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0)
);
-- Workers look for unfinished jobs, oldest first (inside the IMMEDIATE transaction, which
-- holds the write lock, so two workers never claim the same job).
CREATE INDEX jobs_unfinished_idx ON jobs (created_at, id) WHERE status IN ('queued', 'running');
-- The jobs of a resource (e.g. the discoveries of a connector).
CREATE INDEX jobs_resource_idx ON jobs (resource_type, resource_id, kind, created_at);
-- At most one queued or running discovery per connector, even with racing requests.
CREATE UNIQUE INDEX jobs_one_active_discovery_idx ON jobs (resource_id)
    WHERE kind = 'discovery' AND status IN ('queued', 'running');

CREATE TABLE assets (
    id            TEXT   NOT NULL PRIMARY KEY,
    connector_id  TEXT   NOT NULL REFERENCES connectors (id) ON DELETE CASCADE,
    type          TEXT   NOT NULL,
    external_id   TEXT   NOT NULL,
    name          TEXT   NOT NULL,
    region        TEXT,
    environment   TEXT   NOT NULL,
    attributes    TEXT   NOT NULL,
    first_seen_at BIGINT NOT NULL,
    last_seen_at  BIGINT NOT NULL,
    removed_at    BIGINT,
    CONSTRAINT assets_connector_type_external_id_key UNIQUE (connector_id, type, external_id)
);
-- One index per filter of GET /assets, each ending in id for the keyset order (newest
-- first). The unique key above serves the upsert by (connector, type, external id).
CREATE INDEX assets_present_idx ON assets (id) WHERE removed_at IS NULL;
CREATE INDEX assets_connector_idx ON assets (connector_id, id);
CREATE INDEX assets_connector_type_idx ON assets (connector_id, type, id);
CREATE INDEX assets_type_idx ON assets (type, id);
