-- Host agents (api.md §7) (PostgreSQL).
-- An enrollment token is stored only as its SHA-256; an agent secret only sealed (AES-256-GCM
-- under the master key, bound to the agent id). `agent_request_signatures` remembers the
-- signatures of accepted agent requests until their timestamp leaves the 300 s window, so a
-- replayed request is refused on every replica. A command's snapshot can hold file content
-- and is stored sealed. `labels`, `params` and `output` are JSON text.

CREATE TABLE enrollment_tokens (
    id         TEXT COLLATE "C" NOT NULL,
    name       TEXT,
    token_hash TEXT COLLATE "C" NOT NULL,
    expires_at BIGINT  NOT NULL,
    max_uses   INTEGER NOT NULL,
    uses       INTEGER NOT NULL DEFAULT 0,
    created_by TEXT COLLATE "C" NOT NULL,
    created_at BIGINT  NOT NULL,
    revoked_at BIGINT,
    CONSTRAINT enrollment_tokens_pkey PRIMARY KEY (id),
    CONSTRAINT enrollment_tokens_token_hash_key UNIQUE (token_hash),
    CONSTRAINT enrollment_tokens_max_uses_check CHECK (max_uses >= 1),
    -- A registration consumes a use with one conditional UPDATE (`uses < max_uses`); this
    -- bound holds even if a future statement forgets the condition.
    CONSTRAINT enrollment_tokens_uses_check CHECK (uses >= 0 AND uses <= max_uses)
);

CREATE TABLE agents (
    id                  TEXT COLLATE "C" NOT NULL,
    name                TEXT   NOT NULL,
    hostname            TEXT   NOT NULL,
    os                  TEXT   NOT NULL,
    arch                TEXT   NOT NULL,
    version             TEXT   NOT NULL,
    labels              TEXT   NOT NULL,
    sealed_secret       TEXT   NOT NULL,
    enrollment_token_id TEXT COLLATE "C" NOT NULL,
    registered_at       BIGINT NOT NULL,
    last_heartbeat_at   BIGINT,
    revoked_at          BIGINT,
    CONSTRAINT agents_pkey PRIMARY KEY (id),
    CONSTRAINT agents_sealed_secret_check CHECK (sealed_secret LIKE 'v1.%')
);

CREATE TABLE agent_commands (
    id                TEXT COLLATE "C" NOT NULL,
    agent_id          TEXT COLLATE "C" NOT NULL,
    change_request_id TEXT COLLATE "C",
    job_id            TEXT COLLATE "C",
    step              TEXT   NOT NULL,
    command_type      TEXT   NOT NULL,
    params            TEXT   NOT NULL,
    status            TEXT   NOT NULL,
    output            TEXT,
    sealed_snapshot   TEXT,
    error             TEXT,
    created_at        BIGINT NOT NULL,
    dispatched_at     BIGINT,
    finished_at       BIGINT,
    CONSTRAINT agent_commands_pkey PRIMARY KEY (id),
    CONSTRAINT agent_commands_agent_id_fkey FOREIGN KEY (agent_id) REFERENCES agents (id),
    CONSTRAINT agent_commands_status_check CHECK (status IN ('queued', 'dispatched',
        'succeeded', 'failed', 'cancelled')),
    CONSTRAINT agent_commands_sealed_snapshot_check
        CHECK (sealed_snapshot IS NULL OR sealed_snapshot LIKE 'v1.%')
);
-- The next command of an agent; the queued commands of every agent (the dispatch watcher).
CREATE INDEX agent_commands_agent_status_idx ON agent_commands (agent_id, status, id);
CREATE INDEX agent_commands_status_idx ON agent_commands (status, agent_id);
-- One command per job step: dispatching again after a crash finds the first one. (Commands
-- without a job never conflict: NULLs are distinct on both backends.)
CREATE UNIQUE INDEX agent_commands_job_step_idx ON agent_commands (job_id, step);

CREATE TABLE agent_request_signatures (
    signature  TEXT COLLATE "C" NOT NULL,
    agent_id   TEXT COLLATE "C" NOT NULL,
    expires_at BIGINT NOT NULL,
    CONSTRAINT agent_request_signatures_pkey PRIMARY KEY (signature)
);
CREATE INDEX agent_request_signatures_expires_idx ON agent_request_signatures (expires_at);
