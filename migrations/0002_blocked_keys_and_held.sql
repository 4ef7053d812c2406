-- Order while a key waits: the IPN a key is blocked behind, and the key's later IPNs held in
-- arrival order until it is released. See src/worker/gate.rs for the protocol that uses them.

CREATE TABLE ipn_blocked_key (
    order_key   text        PRIMARY KEY,
    -- Message id of the IPN the key waits for (the ingress's message_id, or sha256:<body hash>).
    blocker_id  text        NOT NULL,
    -- 'waiting': in a delay tier, coming back by itself; 'parked': in <p>.parked for an operator.
    state       text        NOT NULL CHECK (state IN ('waiting', 'parked')),
    shard       integer     NOT NULL,
    -- Failed attempts of the blocker so far, and the last error.
    attempts    bigint      NOT NULL,
    last_error  text        NOT NULL,
    txn_type    text,
    txn_id      text,
    blocked_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE ipn_held (
    -- Arrival order within the key.
    id           bigserial   PRIMARY KEY,
    order_key    text        NOT NULL,
    -- A redelivered message is held once.
    message_id   text        NOT NULL UNIQUE,
    body         bytea       NOT NULL,
    content_type text,
    -- x-ipn-received-at as the ingress wrote it (RFC 3339).
    received_at  text,
    attempt      bigint      NOT NULL DEFAULT 0,
    held_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX ipn_held_key ON ipn_held (order_key, id);
