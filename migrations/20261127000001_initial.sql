-- The initial schema. It is written in the SQL that SQLite and PostgreSQL
-- share, so one migration serves both backends.

-- One row whose generation grows with every change to workspaces or keys, so
-- that a running server notices changes made by the CLI or by another instance.
CREATE TABLE catalog (
    id INTEGER PRIMARY KEY,
    generation BIGINT NOT NULL
);
INSERT INTO catalog (id, generation) VALUES (1, 0);

-- Small key/value settings owned by the server, such as the hash of a
-- generated admin key.
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE workspaces (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    timezone TEXT NOT NULL,
    requests_per_minute BIGINT,
    requests_per_day BIGINT,
    tokens_per_minute BIGINT,
    tokens_per_day BIGINT,
    warn_at DOUBLE PRECISION NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- Only the SHA-256 of a key is stored; `prefix` is the first characters of
-- the key, enough to recognise it in a list and useless to an attacker.
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    workspace_id TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE INDEX api_keys_workspace ON api_keys (workspace_id);

-- Counters, blocks and status of each workspace, as one JSON document
-- rewritten by the batched flush.
CREATE TABLE workspace_state (
    workspace_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE notifications (
    id TEXT PRIMARY KEY,
    workspace_id TEXT,
    cause TEXT,
    severity TEXT NOT NULL,
    kind TEXT NOT NULL,
    title TEXT NOT NULL,
    message TEXT NOT NULL,
    suggested_actions TEXT NOT NULL,
    limit_name TEXT,
    created_at BIGINT NOT NULL,
    resolves_at BIGINT,
    resolved_at BIGINT
);
CREATE INDEX notifications_workspace ON notifications (workspace_id, created_at);

-- Finished requests per workspace, model and time bucket, at three
-- resolutions: 'm' (minute, kept 48 h), 'h' (hour, kept 35 days) and
-- 'd' (the workspace's local day, kept 400 days).
CREATE TABLE rollups (
    workspace_id TEXT NOT NULL,
    resolution TEXT NOT NULL,
    bucket BIGINT NOT NULL,
    model TEXT NOT NULL,
    requests BIGINT NOT NULL,
    -- All tokens charged; the breakdown below is known only for requests
    -- whose usage was reported (an expired reservation counts its estimate).
    tokens BIGINT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    cached_tokens BIGINT NOT NULL,
    reasoning_tokens BIGINT NOT NULL,
    errors BIGINT NOT NULL,
    refused BIGINT NOT NULL,
    latency_ms_sum BIGINT NOT NULL,
    PRIMARY KEY (workspace_id, resolution, bucket, model)
);
