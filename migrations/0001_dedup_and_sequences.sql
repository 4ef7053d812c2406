-- The worker's shared state: one row per IPN that became (or is becoming) an event, and the
-- per-key event counter. See src/store/mod.rs for the protocol that uses them.

CREATE TABLE ipn_event (
    -- Stable event id, derived from the dedup key; republishing after a crash reuses it.
    event_id     uuid        PRIMARY KEY,
    -- Transport duplicate: PayPal resending the same bytes.
    body_sha256  text        NOT NULL UNIQUE,
    -- Semantic duplicate: (ipn_track_id, txn_type, txn_id, payment_status), `resend` ignored.
    -- NULL when the IPN has no ipn_track_id (e.g. the simulator's): bytes alone then decide.
    semantic_key text        UNIQUE,
    order_key    text        NOT NULL,
    -- 1, 2, 3... per order key, without gaps; fixed when the row is created.
    sequence     bigint      NOT NULL,
    -- 'pending' from reservation until the broker confirmed the event, then 'done'.
    state        text        NOT NULL CHECK (state IN ('pending', 'done')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    done_at      timestamptz,
    UNIQUE (order_key, sequence)
);

CREATE INDEX ipn_event_done_at ON ipn_event (done_at) WHERE state = 'done';

CREATE TABLE ipn_key_sequence (
    order_key     text   PRIMARY KEY,
    last_sequence bigint NOT NULL
);
