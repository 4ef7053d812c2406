-- Which subscription/recurring profile a transaction was paid under, learned from the IPNs the
-- bridge claimed. A refund, reversal, case or adjustment that names only a txn_id or
-- parent_txn_id is re-routed to that profile's order key, so it cannot overtake the payments of
-- its own subscription (src/worker/gate.rs).

CREATE TABLE ipn_txn_profile (
    txn_id     text        PRIMARY KEY,
    order_key  text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX ipn_txn_profile_created_at ON ipn_txn_profile (created_at);
