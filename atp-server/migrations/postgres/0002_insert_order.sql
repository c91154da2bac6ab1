-- Version 2: an insertion order for the rows that need one (SQLite has its
-- `rowid`): the webhooks (listed oldest first) and the exchange tokens (a
-- tool keeps its newest 16).
ALTER TABLE webhooks ADD COLUMN IF NOT EXISTS seq BIGSERIAL;
ALTER TABLE exchange_tokens ADD COLUMN IF NOT EXISTS seq BIGSERIAL;
