-- Version 3: the audit log (docs/OPERATIONS.md, "Audit log"): one row per
-- tool call (run or refused) and per admin action. Never a key (only a
-- key id, the start of its hash), never a token; arguments and results
-- only for the toolkits named in `audit_payloads`. AUTOINCREMENT: an id
-- is never reused, so the API's cursors stay valid after a purge.
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    key_id TEXT,
    developer TEXT,
    toolkit TEXT,
    tool TEXT,
    action TEXT,
    target TEXT,
    via TEXT NOT NULL,
    transport TEXT,
    duration_ms REAL NOT NULL,
    outcome TEXT NOT NULL,
    error_code TEXT,
    arguments TEXT,
    result TEXT
);
CREATE INDEX IF NOT EXISTS audit_at ON audit (at_ms);
CREATE INDEX IF NOT EXISTS audit_toolkit ON audit (toolkit, id);
