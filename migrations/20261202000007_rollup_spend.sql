-- History carries what was spent: each bucket's usd as budgets count it, in
-- whole nano-dollars (10^-9 USD). Buckets written before have spent nothing
-- that is known.
ALTER TABLE rollups ADD COLUMN usd_nano BIGINT NOT NULL DEFAULT 0;
