-- The execution engine's journals and the sealed secret outputs of change requests
-- (api.md §6, §6.2) (PostgreSQL).
-- `body` is the journal as JSON text: steps with their status, outputs, the precheck's
-- context, the names of the secret outputs, the error. It is written before and after every
-- provider call. A secret output is stored only sealed (AES-256-GCM under the master key,
-- `v1.<key id>.<nonce>.<ciphertext>`, the change request id and the name bound in as
-- associated data) and deleted when it is revealed.

CREATE TABLE change_request_journals (
    change_request_id TEXT COLLATE "C" NOT NULL,
    kind              TEXT   NOT NULL,
    job_id            TEXT COLLATE "C" NOT NULL,
    body              TEXT   NOT NULL,
    updated_at        BIGINT NOT NULL,
    CONSTRAINT change_request_journals_pkey PRIMARY KEY (change_request_id, kind),
    CONSTRAINT change_request_journals_change_request_id_fkey FOREIGN KEY (change_request_id)
        REFERENCES change_requests (id),
    CONSTRAINT change_request_journals_kind_check CHECK (kind IN ('execution', 'rollback'))
);

CREATE TABLE change_request_secrets (
    change_request_id TEXT COLLATE "C" NOT NULL,
    name              TEXT   NOT NULL,
    sealed_value      TEXT   NOT NULL,
    created_at        BIGINT NOT NULL,
    CONSTRAINT change_request_secrets_pkey PRIMARY KEY (change_request_id, name),
    CONSTRAINT change_request_secrets_change_request_id_fkey FOREIGN KEY (change_request_id)
        REFERENCES change_requests (id),
    CONSTRAINT change_request_secrets_sealed_check CHECK (sealed_value LIKE 'v1.%')
);
