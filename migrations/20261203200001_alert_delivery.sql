-- Alert delivery: channels that receive notifications' events, a persistent
-- outbox of those events, one delivery per event and channel, and every
-- attempt made. Written in the SQL SQLite and PostgreSQL share; flags are
-- BIGINT 0 or 1, and every text a client or a receiver gives is bounded.

-- Where alerts go. `workspace_id` NULL is a global channel, which receives
-- every workspace's events and the service-wide ones. The webhook secret
-- is kept as given: it signs every message, so it cannot be hashed.
CREATE TABLE alert_channels (
    id TEXT PRIMARY KEY CHECK (length(id) <= 64),
    name TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 400),
    workspace_id TEXT CHECK (workspace_id IS NULL OR length(workspace_id) <= 64),
    -- webhook or slack, as the code names them; not listed here, so that a
    -- new kind of channel (email) needs no rebuild of the table in SQLite.
    kind TEXT NOT NULL CHECK (length(kind) BETWEEN 1 AND 32),
    url TEXT NOT NULL CHECK (length(url) <= 2048),
    secret TEXT CHECK (secret IS NULL OR length(secret) <= 100),
    -- A JSON list of notification kinds; NULL is every kind.
    events TEXT CHECK (events IS NULL OR length(events) <= 2048),
    min_severity TEXT NOT NULL CHECK (min_severity IN ('info', 'warning', 'critical')),
    resolutions BIGINT NOT NULL CHECK (resolutions IN (0, 1)),
    enabled BIGINT NOT NULL CHECK (enabled IN (0, 1)),
    source TEXT NOT NULL CHECK (source IN ('api', 'config')),
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX alert_channels_workspace ON alert_channels (workspace_id);

-- The outbox: one row per notification and phase, written in the flush's
-- transaction with the notification itself (INSERT ... ON CONFLICT DO
-- NOTHING), so that an event is enqueued once however many instances or
-- rewrites write its notification. It carries what the notification said
-- then, copied from the notification's row (whose text columns are not
-- bounded either: the server writes them, and a refused row would take the
-- notification with it). `fanned_out` is 1 once its deliveries exist.
CREATE TABLE alert_events (
    id TEXT PRIMARY KEY,
    notification_id TEXT NOT NULL,
    phase TEXT NOT NULL CHECK (phase IN ('raised', 'resolved')),
    workspace_id TEXT,
    kind TEXT NOT NULL,
    severity TEXT NOT NULL CHECK (severity IN ('info', 'warning', 'critical')),
    title TEXT NOT NULL,
    message TEXT NOT NULL,
    suggested_actions TEXT NOT NULL,
    limit_name TEXT,
    threshold TEXT,
    resolves_at BIGINT,
    occurred_at BIGINT NOT NULL,
    fanned_out BIGINT NOT NULL DEFAULT 0 CHECK (fanned_out IN (0, 1)),
    UNIQUE (notification_id, phase)
);
CREATE INDEX alert_events_pending ON alert_events (fanned_out, occurred_at);

-- One event for one channel. `claimed_until` is the lease of the
-- dispatcher sending it, so that two dispatchers never send it at once;
-- `claimed_by` names that dispatcher, which releases its claims on stop.
CREATE TABLE alert_deliveries (
    id TEXT PRIMARY KEY CHECK (length(id) <= 64),
    event_id TEXT NOT NULL,
    channel_id TEXT NOT NULL CHECK (length(channel_id) <= 64),
    workspace_id TEXT CHECK (workspace_id IS NULL OR length(workspace_id) <= 64),
    status TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'gave_up')),
    attempts BIGINT NOT NULL CHECK (attempts >= 0),
    next_attempt_at BIGINT NOT NULL,
    first_attempt_at BIGINT,
    claimed_until BIGINT,
    claimed_by TEXT CHECK (claimed_by IS NULL OR length(claimed_by) <= 64),
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    UNIQUE (event_id, channel_id)
);
CREATE INDEX alert_deliveries_due ON alert_deliveries (status, next_attempt_at);
CREATE INDEX alert_deliveries_channel ON alert_deliveries (channel_id, created_at);

-- Every attempt of a delivery, numbered from 1.
CREATE TABLE alert_attempts (
    delivery_id TEXT NOT NULL CHECK (length(delivery_id) <= 64),
    number BIGINT NOT NULL CHECK (number >= 1),
    attempted_at BIGINT NOT NULL,
    outcome TEXT NOT NULL CHECK (outcome IN ('delivered', 'retry', 'gave_up')),
    http_status BIGINT CHECK (http_status IS NULL OR http_status BETWEEN 100 AND 999),
    error TEXT CHECK (error IS NULL OR length(error) <= 1000),
    duration_ms BIGINT NOT NULL CHECK (duration_ms >= 0),
    next_attempt_at BIGINT,
    -- The digest this attempt sent the delivery in, if it went in one.
    digest_id TEXT CHECK (digest_id IS NULL OR length(digest_id) <= 64),
    PRIMARY KEY (delivery_id, number)
);
