-- A workspace may name the OpenAI organization and project billed for its
-- calls (sent upstream as OpenAI-Organization / OpenAI-Project, which clients
-- cannot send themselves); NULL means the upstream key's default.
ALTER TABLE workspaces ADD COLUMN upstream_organization TEXT;
ALTER TABLE workspaces ADD COLUMN upstream_project TEXT;
