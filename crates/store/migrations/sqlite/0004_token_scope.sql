-- What a token may do: `scim` (the SCIM API, for identity providers) or `admin` (the read-only
-- dashboard). A token of one scope is never accepted by the other.
ALTER TABLE api_tokens ADD COLUMN scope TEXT NOT NULL DEFAULT 'scim';
