-- Event history: the event each done IPN became, as it was published, kept as long as its dedup
-- record (database.dedup_retention) and purged with it. Written by the same UPDATE that marks
-- the IPN done, so a done row always has its event and a crash never leaves two (src/store).
-- `ipnctl events find` / `redeliver` read it.

ALTER TABLE ipn_event
    ADD COLUMN routing_key text,
    ADD COLUMN txn_id      text,
    -- The event's JSON exactly as published (text, not jsonb: jsonb refuses the \u0000 a
    -- field may carry, and would reorder keys).
    ADD COLUMN event_json  text;

CREATE INDEX ipn_event_txn_id ON ipn_event (txn_id) WHERE txn_id IS NOT NULL;
