-- Version 2: the API keys made with `atp-server keys create`, kept as
-- hashes (never the key), each with a short public id.
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL CHECK (kind IN ('toolkit', 'llm')),
    developer TEXT,
    scope TEXT NOT NULL DEFAULT '[]',
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
