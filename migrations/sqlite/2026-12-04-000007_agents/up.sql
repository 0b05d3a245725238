-- Host agents (api.md §7) (SQLite).
-- An enrollment token is stored only as its SHA-256; an agent secret only sealed (AES-256-GCM
-- under the master key, bound to the agent id). `agent_request_signatures` remembers the
-- signatures of accepted agent requests until their timestamp leaves the 300 s window, so a
-- replayed request is refused on every replica. A command's snapshot can hold file content
-- and is stored sealed. `labels`, `params` and `output` are JSON text.

CREATE TABLE enrollment_tokens (
    id         TEXT    NOT NULL PRIMARY KEY,
    name       TEXT,
    token_hash TEXT    NOT NULL UNIQUE,
    expires_at BIGINT  NOT NULL,
    max_uses   INTEGER NOT NULL CHECK (max_uses >= 1),
    -- A registration consumes a use with one conditional UPDATE (`uses < max_uses`); this
    -- bound holds even if a future statement forgets the condition.
    uses       INTEGER NOT NULL DEFAULT 0 CHECK (uses >= 0 AND uses <= max_uses),
    created_by TEXT    NOT NULL,
    created_at BIGINT  NOT NULL,
    revoked_at BIGINT
);

CREATE TABLE agents (
    id                  TEXT   NOT NULL PRIMARY KEY,
    name                TEXT   NOT NULL,
    hostname            TEXT   NOT NULL,
    os                  TEXT   NOT NULL,
    arch                TEXT   NOT NULL,
    version             TEXT   NOT NULL,
    labels              TEXT   NOT NULL,
    sealed_secret       TEXT   NOT NULL CHECK (sealed_secret LIKE 'v1.%'),
    enrollment_token_id TEXT   NOT NULL,
    registered_at       BIGINT NOT NULL,
    last_heartbeat_at   BIGINT,
    revoked_at          BIGINT
);

CREATE TABLE agent_commands (
    id                TEXT   NOT NULL PRIMARY KEY,
    agent_id          TEXT   NOT NULL REFERENCES agents (id),
    change_request_id TEXT,
    job_id            TEXT,
    step              TEXT   NOT NULL,
    command_type      TEXT   NOT NULL,
    params            TEXT   NOT NULL,
    status            TEXT   NOT NULL CHECK (status IN ('queued', 'dispatched', 'succeeded',
        'failed', 'cancelled')),
    output            TEXT,
    sealed_snapshot   TEXT CHECK (sealed_snapshot IS NULL OR sealed_snapshot LIKE 'v1.%'),
    error             TEXT,
    created_at        BIGINT NOT NULL,
    dispatched_at     BIGINT,
    finished_at       BIGINT
);
-- The next command of an agent; the queued commands of every agent (the dispatch watcher).
CREATE INDEX agent_commands_agent_status_idx ON agent_commands (agent_id, status, id);
CREATE INDEX agent_commands_status_idx ON agent_commands (status, agent_id);
-- One command per job step: dispatching again after a crash finds the first one. (Commands
-- without a job never conflict: NULLs are distinct on both backends.)
CREATE UNIQUE INDEX agent_commands_job_step_idx ON agent_commands (job_id, step);

CREATE TABLE agent_request_signatures (
    signature  TEXT   NOT NULL PRIMARY KEY,
    agent_id   TEXT   NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX agent_request_signatures_expires_idx ON agent_request_signatures (expires_at);
