-- Workspaces gain limits over the calendar month in their timezone. A
-- workspace has a column per limit kind, named after it
-- ("{metric}_per_{window}"): the store writes its queries from the list of
-- kinds, so a new kind needs only its column here. NULL is unlimited.
ALTER TABLE workspaces ADD COLUMN requests_per_month BIGINT;
ALTER TABLE workspaces ADD COLUMN tokens_per_month BIGINT;
