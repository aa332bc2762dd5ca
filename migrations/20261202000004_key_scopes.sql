-- Keys gain what they may do. A workspace key has scopes (a comma-separated
-- subset of proxy, report and read; keys made before have all three); a
-- service key has no workspace of its own and the single scope `service`,
-- and acts for the workspaces in `service_workspaces` (comma-separated; NULL
-- for any) when a request names one. Every key gets a name, an optional
-- expiry and the time it was last used (to the minute).
--
-- SQLite cannot drop a NOT NULL constraint, so the table is rebuilt; the
-- same statements serve PostgreSQL.
CREATE TABLE api_keys_scoped (
    id TEXT PRIMARY KEY,
    workspace_id TEXT,
    key_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    name TEXT NOT NULL DEFAULT '',
    scopes TEXT NOT NULL,
    service_workspaces TEXT,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    last_used_at BIGINT,
    revoked_at BIGINT,
    CHECK ((workspace_id IS NULL) = (scopes = 'service')),
    CHECK (service_workspaces IS NULL OR workspace_id IS NULL),
    CHECK (length(name) <= 100)
);
INSERT INTO api_keys_scoped (id, workspace_id, key_hash, prefix, name, scopes, created_at, revoked_at)
    SELECT id, workspace_id, key_hash, prefix, '', 'proxy,report,read', created_at, revoked_at FROM api_keys;
DROP TABLE api_keys;
ALTER TABLE api_keys_scoped RENAME TO api_keys;
CREATE INDEX api_keys_workspace ON api_keys (workspace_id);
