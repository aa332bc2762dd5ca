-- Workspaces gain alert thresholds: the shares of their day and month limits
-- whose crossing is announced (default 50, 80, 95 and 100 %), with lists of
-- their own for some limits. A small document read and written whole with
-- the workspace (see store::thresholds_json), bounded so that no row can grow
-- without end. NULL is the defaults.
ALTER TABLE workspaces ADD COLUMN alert_thresholds TEXT CHECK (alert_thresholds IS NULL OR length(alert_thresholds) <= 8192);
-- A threshold_crossed notification names its crossing: the threshold, the
-- usage and limit it was seen at, and the period (a JSON object). NULL for
-- every other notification.
ALTER TABLE notifications ADD COLUMN threshold TEXT CHECK (threshold IS NULL OR length(threshold) <= 1024);
