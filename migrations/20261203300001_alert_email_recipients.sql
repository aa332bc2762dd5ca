-- Email alert channels: their recipients, a JSON list of at most 20
-- addresses of at most 254 bytes each (the code checks them; the bound
-- here keeps a row from growing past what the code could have written).
-- NULL for the other kinds, whose receiver is `url`, which an email channel
-- leaves empty.
ALTER TABLE alert_channels ADD COLUMN recipients TEXT CHECK (recipients IS NULL OR length(recipients) <= 6000);
