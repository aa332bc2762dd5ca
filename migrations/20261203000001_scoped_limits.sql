-- Workspaces gain scoped limits: limits on the calls of some models and of
-- each end user, on top of the workspace's own. They are a few small rules,
-- read and written whole with the workspace and never queried by content,
-- so they are one JSON document (see store::scoped_limits_json), bounded
-- here so that no row can grow without end. NULL is none.
ALTER TABLE workspaces ADD COLUMN scoped_limits TEXT CHECK (scoped_limits IS NULL OR length(scoped_limits) <= 16384);
