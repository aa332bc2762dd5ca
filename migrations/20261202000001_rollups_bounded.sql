-- The database itself refuses rollup rows that quotawatch must never write:
-- a model name longer than clients may send, an unknown resolution, or a
-- negative count. Such a row is a bug below the API; the flush then drops it
-- alone (and counts it) instead of failing every later write. SQLite cannot
-- add a constraint to an existing table, so the table is rebuilt, in the SQL
-- both databases share.
CREATE TABLE rollups_bounded (
    workspace_id TEXT NOT NULL,
    resolution TEXT NOT NULL CHECK (resolution IN ('m', 'h', 'd')),
    bucket BIGINT NOT NULL,
    model TEXT NOT NULL CHECK (length(model) <= 100),
    requests BIGINT NOT NULL CHECK (requests >= 0),
    tokens BIGINT NOT NULL CHECK (tokens >= 0),
    prompt_tokens BIGINT NOT NULL CHECK (prompt_tokens >= 0),
    completion_tokens BIGINT NOT NULL CHECK (completion_tokens >= 0),
    cached_tokens BIGINT NOT NULL CHECK (cached_tokens >= 0),
    reasoning_tokens BIGINT NOT NULL CHECK (reasoning_tokens >= 0),
    errors BIGINT NOT NULL CHECK (errors >= 0),
    client_errors BIGINT NOT NULL DEFAULT 0 CHECK (client_errors >= 0),
    server_errors BIGINT NOT NULL DEFAULT 0 CHECK (server_errors >= 0),
    refused BIGINT NOT NULL CHECK (refused >= 0),
    latency_ms_sum BIGINT NOT NULL CHECK (latency_ms_sum >= 0),
    PRIMARY KEY (workspace_id, resolution, bucket, model)
);

-- SQLite turned a sum that overflowed into a floating-point value beyond
-- the largest BIGINT; it is stored as that largest BIGINT, where counts now
-- stop.
INSERT INTO rollups_bounded (workspace_id, resolution, bucket, model, requests, tokens, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, errors, client_errors, server_errors, refused, latency_ms_sum)
SELECT workspace_id, resolution, bucket, model,
    CASE WHEN requests > 9223372036854775807 THEN 9223372036854775807 ELSE requests END,
    CASE WHEN tokens > 9223372036854775807 THEN 9223372036854775807 ELSE tokens END,
    CASE WHEN prompt_tokens > 9223372036854775807 THEN 9223372036854775807 ELSE prompt_tokens END,
    CASE WHEN completion_tokens > 9223372036854775807 THEN 9223372036854775807 ELSE completion_tokens END,
    CASE WHEN cached_tokens > 9223372036854775807 THEN 9223372036854775807 ELSE cached_tokens END,
    CASE WHEN reasoning_tokens > 9223372036854775807 THEN 9223372036854775807 ELSE reasoning_tokens END,
    CASE WHEN errors > 9223372036854775807 THEN 9223372036854775807 ELSE errors END,
    CASE WHEN client_errors > 9223372036854775807 THEN 9223372036854775807 ELSE client_errors END,
    CASE WHEN server_errors > 9223372036854775807 THEN 9223372036854775807 ELSE server_errors END,
    CASE WHEN refused > 9223372036854775807 THEN 9223372036854775807 ELSE refused END,
    CASE WHEN latency_ms_sum > 9223372036854775807 THEN 9223372036854775807 ELSE latency_ms_sum END
FROM rollups
WHERE length(model) <= 100;

-- Rows written before the API bounded model names keep their counts under
-- 'other', the name history gives to models beyond a day's cap. Their sums
-- are taken in floating point and capped at the largest BIGINT, so that
-- counts stuck at their maximum cannot fail the migration.
INSERT INTO rollups_bounded (workspace_id, resolution, bucket, model, requests, tokens, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, errors, client_errors, server_errors, refused, latency_ms_sum)
SELECT workspace_id, resolution, bucket, 'other',
    CASE WHEN SUM(CAST(requests AS DOUBLE PRECISION)) >= 9.2e18 THEN 9223372036854775807 ELSE CAST(SUM(CAST(requests AS DOUBLE PRECISION)) AS BIGINT) END,
    CASE WHEN SUM(CAST(tokens AS DOUBLE PRECISION)) >= 9.2e18 THEN 9223372036854775807 ELSE CAST(SUM(CAST(tokens AS DOUBLE PRECISION)) AS BIGINT) END,
    CASE WHEN SUM(CAST(prompt_tokens AS DOUBLE PRECISION)) >= 9.2e18 THEN 9223372036854775807 ELSE CAST(SUM(CAST(prompt_tokens AS DOUBLE PRECISION)) AS BIGINT) END,
    CASE WHEN SUM(CAST(completion_tokens AS DOUBLE PRECISION)) >= 9.2e18 THEN 9223372036854775807 ELSE CAST(SUM(CAST(completion_tokens AS DOUBLE PRECISION)) AS BIGINT) END,
    CASE WHEN SUM(CAST(cached_tokens AS DOUBLE PRECISION)) >= 9.2e18 THEN 9223372036854775807 ELSE CAST(SUM(CAST(cached_tokens AS DOUBLE PRECISION)) AS BIGINT) END,
    CASE WHEN SUM(CAST(reasoning_tokens AS DOUBLE PRECISION)) >= 9.2e18 THEN 9223372036854775807 ELSE CAST(SUM(CAST(reasoning_tokens AS DOUBLE PRECISION)) AS BIGINT) END,
    CASE WHEN SUM(CAST(errors AS DOUBLE PRECISION)) >= 9.2e18 THEN 9223372036854775807 ELSE CAST(SUM(CAST(errors AS DOUBLE PRECISION)) AS BIGINT) END,
    CASE WHEN SUM(CAST(client_errors AS DOUBLE PRECISION)) >= 9.2e18 THEN 9223372036854775807 ELSE CAST(SUM(CAST(client_errors AS DOUBLE PRECISION)) AS BIGINT) END,
    CASE WHEN SUM(CAST(server_errors AS DOUBLE PRECISION)) >= 9.2e18 THEN 9223372036854775807 ELSE CAST(SUM(CAST(server_errors AS DOUBLE PRECISION)) AS BIGINT) END,
    CASE WHEN SUM(CAST(refused AS DOUBLE PRECISION)) >= 9.2e18 THEN 9223372036854775807 ELSE CAST(SUM(CAST(refused AS DOUBLE PRECISION)) AS BIGINT) END,
    CASE WHEN SUM(CAST(latency_ms_sum AS DOUBLE PRECISION)) >= 9.2e18 THEN 9223372036854775807 ELSE CAST(SUM(CAST(latency_ms_sum AS DOUBLE PRECISION)) AS BIGINT) END
FROM rollups
WHERE length(model) > 100
GROUP BY workspace_id, resolution, bucket
ON CONFLICT (workspace_id, resolution, bucket, model) DO UPDATE SET
    requests = CASE WHEN excluded.requests > 9223372036854775807 - rollups_bounded.requests THEN 9223372036854775807 ELSE rollups_bounded.requests + excluded.requests END,
    tokens = CASE WHEN excluded.tokens > 9223372036854775807 - rollups_bounded.tokens THEN 9223372036854775807 ELSE rollups_bounded.tokens + excluded.tokens END,
    prompt_tokens = CASE WHEN excluded.prompt_tokens > 9223372036854775807 - rollups_bounded.prompt_tokens THEN 9223372036854775807 ELSE rollups_bounded.prompt_tokens + excluded.prompt_tokens END,
    completion_tokens = CASE WHEN excluded.completion_tokens > 9223372036854775807 - rollups_bounded.completion_tokens THEN 9223372036854775807 ELSE rollups_bounded.completion_tokens + excluded.completion_tokens END,
    cached_tokens = CASE WHEN excluded.cached_tokens > 9223372036854775807 - rollups_bounded.cached_tokens THEN 9223372036854775807 ELSE rollups_bounded.cached_tokens + excluded.cached_tokens END,
    reasoning_tokens = CASE WHEN excluded.reasoning_tokens > 9223372036854775807 - rollups_bounded.reasoning_tokens THEN 9223372036854775807 ELSE rollups_bounded.reasoning_tokens + excluded.reasoning_tokens END,
    errors = CASE WHEN excluded.errors > 9223372036854775807 - rollups_bounded.errors THEN 9223372036854775807 ELSE rollups_bounded.errors + excluded.errors END,
    client_errors = CASE WHEN excluded.client_errors > 9223372036854775807 - rollups_bounded.client_errors THEN 9223372036854775807 ELSE rollups_bounded.client_errors + excluded.client_errors END,
    server_errors = CASE WHEN excluded.server_errors > 9223372036854775807 - rollups_bounded.server_errors THEN 9223372036854775807 ELSE rollups_bounded.server_errors + excluded.server_errors END,
    refused = CASE WHEN excluded.refused > 9223372036854775807 - rollups_bounded.refused THEN 9223372036854775807 ELSE rollups_bounded.refused + excluded.refused END,
    latency_ms_sum = CASE WHEN excluded.latency_ms_sum > 9223372036854775807 - rollups_bounded.latency_ms_sum THEN 9223372036854775807 ELSE rollups_bounded.latency_ms_sum + excluded.latency_ms_sum END;

DROP TABLE rollups;
ALTER TABLE rollups_bounded RENAME TO rollups;
