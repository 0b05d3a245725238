-- Connectors and their sealed credentials (PostgreSQL).
-- A credential value is stored only sealed (AES-256-GCM, `v1.<key id>.<nonce>.<ciphertext>`,
-- the connector id bound in as associated data), one row per credential name.

CREATE TABLE connectors (
    id                 TEXT COLLATE "C" NOT NULL,
    name               TEXT   NOT NULL,
    type               TEXT   NOT NULL,
    environment        TEXT   NOT NULL,
    settings           TEXT   NOT NULL,
    status             TEXT   NOT NULL,
    last_tested_at     BIGINT,
    last_test_error    TEXT,
    last_discovered_at BIGINT,
    created_at         BIGINT NOT NULL,
    updated_at         BIGINT NOT NULL,
    CONSTRAINT connectors_pkey PRIMARY KEY (id),
    CONSTRAINT connectors_name_key UNIQUE (name),
    CONSTRAINT connectors_environment_check
        CHECK (environment IN ('production', 'staging', 'development')),
    CONSTRAINT connectors_status_check CHECK (status IN ('untested', 'ok', 'error'))
);

CREATE TABLE connector_credentials (
    connector_id TEXT COLLATE "C" NOT NULL,
    name         TEXT NOT NULL,
    sealed_value TEXT NOT NULL,
    CONSTRAINT connector_credentials_pkey PRIMARY KEY (connector_id, name),
    CONSTRAINT connector_credentials_connector_id_fkey FOREIGN KEY (connector_id)
        REFERENCES connectors (id) ON DELETE CASCADE,
    CONSTRAINT connector_credentials_sealed_check CHECK (sealed_value LIKE 'v1.%')
);
