-- The execution engine's journals and the sealed secret outputs of change requests
-- (api.md §6, §6.2) (SQLite).
-- `body` is the journal as JSON text: steps with their status, outputs, the precheck's
-- context, the names of the secret outputs, the error. It is written before and after every
-- provider call. A secret output is stored only sealed (AES-256-GCM under the master key,
-- `v1.<key id>.<nonce>.<ciphertext>`, the change request id and the name bound in as
-- associated data) and deleted when it is revealed.

CREATE TABLE change_request_journals (
    change_request_id TEXT   NOT NULL REFERENCES change_requests (id),
    kind              TEXT   NOT NULL CHECK (kind IN ('execution', 'rollback')),
    job_id            TEXT   NOT NULL,
    body              TEXT   NOT NULL,
    updated_at        BIGINT NOT NULL,
    PRIMARY KEY (change_request_id, kind)
);

CREATE TABLE change_request_secrets (
    change_request_id TEXT   NOT NULL REFERENCES change_requests (id),
    name              TEXT   NOT NULL,
    sealed_value      TEXT   NOT NULL CHECK (sealed_value LIKE 'v1.%'),
    created_at        BIGINT NOT NULL,
    PRIMARY KEY (change_request_id, name)
);
