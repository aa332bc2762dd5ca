-- A workspace may name the environment variable that holds its own upstream
-- (OpenAI) key; NULL means the server's OPENAI_API_KEY.
ALTER TABLE workspaces ADD COLUMN upstream_key_env TEXT;
