-- Connectors and their sealed credentials (SQLite).
-- A credential value is stored only sealed (AES-256-GCM, `v1.<key id>.<nonce>.<ciphertext>`,
-- the connector id bound in as associated data), one row per credential name.

CREATE TABLE connectors (
    id                 TEXT   NOT NULL PRIMARY KEY,
    name               TEXT   NOT NULL,
    type               TEXT   NOT NULL,
    environment        TEXT   NOT NULL
        CHECK (environment IN ('production', 'staging', 'development')),
    settings           TEXT   NOT NULL,
    status             TEXT   NOT NULL CHECK (status IN ('untested', 'ok', 'error')),
    last_tested_at     BIGINT,
    last_test_error    TEXT,
    last_discovered_at BIGINT,
    created_at         BIGINT NOT NULL,
    updated_at         BIGINT NOT NULL,
    CONSTRAINT connectors_name_key UNIQUE (name)
);

CREATE TABLE connector_credentials (
    connector_id TEXT NOT NULL REFERENCES connectors (id) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    sealed_value TEXT NOT NULL CHECK (sealed_value LIKE 'v1.%'),
    PRIMARY KEY (connector_id, name)
);
