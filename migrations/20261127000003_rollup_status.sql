-- Failed calls split by who was at fault: a 4xx is the caller's request (or
-- its quota), a 5xx or a missing answer is the upstream's. `errors` keeps
-- counting every failure, so old rows stay meaningful.
ALTER TABLE rollups ADD COLUMN client_errors BIGINT NOT NULL DEFAULT 0;
ALTER TABLE rollups ADD COLUMN server_errors BIGINT NOT NULL DEFAULT 0;
