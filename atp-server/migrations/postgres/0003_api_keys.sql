-- Version 3: the API keys made with `atp-server keys create`, kept as
-- hashes (never the key), each with a short public id.
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    -- The order they were made in (`keys list`).
    seq BIGSERIAL NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL CHECK (kind IN ('toolkit', 'llm')),
    developer TEXT,
    scope TEXT NOT NULL DEFAULT '[]',
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
