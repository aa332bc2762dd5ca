-- What a tenant's own users may be shown of a notification (a JSON object
-- of title, message and suggested_actions); NULL for those written before.
ALTER TABLE notifications ADD COLUMN tenant TEXT;
