-- Change requests (api.md §6) without their execution journal (PostgreSQL).
-- `target`, `risk`, `approvals` and `rejection` are JSON text. `connector_id` has no foreign
-- key on purpose: deleting a connector keeps the history of its change requests.

CREATE TABLE change_requests (
    id                 TEXT COLLATE "C" NOT NULL,
    title              TEXT    NOT NULL,
    description        TEXT    NOT NULL,
    connector_id       TEXT COLLATE "C",
    change_type        TEXT    NOT NULL,
    target             TEXT    NOT NULL,
    state              TEXT    NOT NULL,
    risk               TEXT    NOT NULL,
    required_approvals INTEGER NOT NULL,
    approvals          TEXT    NOT NULL,
    rejection          TEXT,
    requested_by       TEXT COLLATE "C" NOT NULL,
    environment        TEXT    NOT NULL,
    applied_steps      INTEGER NOT NULL DEFAULT 0,
    created_at         BIGINT  NOT NULL,
    updated_at         BIGINT  NOT NULL,
    submitted_at       BIGINT,
    decided_at         BIGINT,
    executed_at        BIGINT,
    finished_at        BIGINT,
    CONSTRAINT change_requests_pkey PRIMARY KEY (id),
    CONSTRAINT change_requests_state_check CHECK (state IN ('draft', 'submitted', 'approved',
        'rejected', 'cancelled', 'executing', 'complete', 'failed', 'rolling_back',
        'rolledback', 'rollback_failed')),
    CONSTRAINT change_requests_environment_check
        CHECK (environment IN ('production', 'staging', 'development')),
    CONSTRAINT change_requests_required_approvals_check CHECK (required_approvals >= 1),
    CONSTRAINT change_requests_applied_steps_check CHECK (applied_steps >= 0)
);
-- One index per filter of GET /change-requests, each ending in id for the keyset order
-- (newest first). (connector_id, state, id) also answers "is this connector in use?".
CREATE INDEX change_requests_state_idx ON change_requests (state, id);
CREATE INDEX change_requests_connector_idx ON change_requests (connector_id, state, id);
CREATE INDEX change_requests_connector_id_idx ON change_requests (connector_id, id);
CREATE INDEX change_requests_change_type_idx ON change_requests (change_type, id);
CREATE INDEX change_requests_requested_by_idx ON change_requests (requested_by, id);
