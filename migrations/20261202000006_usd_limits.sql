-- Workspaces gain budgets: limits on money spent, counted in whole
-- nano-dollars (10^-9 USD), per window like every other metric. The API
-- shows and takes them in dollars. NULL is unlimited.
ALTER TABLE workspaces ADD COLUMN usd_per_minute BIGINT;
ALTER TABLE workspaces ADD COLUMN usd_per_day BIGINT;
ALTER TABLE workspaces ADD COLUMN usd_per_month BIGINT;
