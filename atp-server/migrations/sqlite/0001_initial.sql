-- Version 1: the schema of atp-server 0.1 (registrations, OAuth, webhooks,
-- the store's exchange tokens and the execution log). `IF NOT EXISTS`:
-- databases made before versioned migrations already have these tables.
CREATE TABLE IF NOT EXISTS toolkits (
    app_name TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL,
    endpoint_url TEXT,
    endpoint_key TEXT,
    toolkit_hash TEXT,
    language TEXT NOT NULL DEFAULT '',
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tools (
    app_name TEXT NOT NULL REFERENCES toolkits(app_name) ON DELETE CASCADE,
    name TEXT NOT NULL,
    position INTEGER NOT NULL,
    code_hash TEXT NOT NULL,
    metadata TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (app_name, name)
);
CREATE TABLE IF NOT EXISTS oauth_platforms (
    id TEXT PRIMARY KEY,
    config TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS oauth_states (
    state TEXT PRIMARY KEY,
    platform_id TEXT NOT NULL,
    external_user_id TEXT NOT NULL,
    llm_key_hash TEXT NOT NULL,
    code_verifier TEXT NOT NULL,
    redirect_url TEXT,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS oauth_connections (
    llm_key_hash TEXT NOT NULL,
    platform_id TEXT NOT NULL,
    external_user_id TEXT NOT NULL,
    integration_id TEXT NOT NULL,
    access_token TEXT NOT NULL,
    refresh_token TEXT,
    token_type TEXT,
    scope TEXT,
    expires_at INTEGER,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (llm_key_hash, platform_id, external_user_id)
);
CREATE TABLE IF NOT EXISTS webhooks (
    webhook_id TEXT PRIMARY KEY,
    llm_key_hash TEXT NOT NULL,
    url TEXT NOT NULL,
    events TEXT NOT NULL,
    secret TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS webhooks_by_key ON webhooks (llm_key_hash);
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    delivery_id TEXT PRIMARY KEY,
    webhook_id TEXT NOT NULL REFERENCES webhooks(webhook_id) ON DELETE CASCADE,
    event TEXT NOT NULL,
    body TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    last_status INTEGER,
    last_error TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    delivered_at INTEGER
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (status, next_attempt_ms);
CREATE INDEX IF NOT EXISTS webhook_deliveries_by_webhook ON webhook_deliveries (webhook_id, status);
CREATE TABLE IF NOT EXISTS exchange_tokens (
    token_hash TEXT PRIMARY KEY,
    app_name TEXT NOT NULL,
    function_id TEXT NOT NULL,
    key_hash TEXT NOT NULL,
    issued_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS exchange_tokens_by_tool ON exchange_tokens (app_name, function_id);
CREATE TABLE IF NOT EXISTS executions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    app_name TEXT NOT NULL,
    function_id TEXT NOT NULL,
    result TEXT NOT NULL,
    reported_at INTEGER NOT NULL
);
