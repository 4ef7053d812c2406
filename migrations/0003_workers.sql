-- Live workers, for sharing the shard queues among them (src/worker/ownership.rs). A worker is
-- live while its heartbeat is recent; each shard is owned by one live worker, picked by
-- rendezvous hashing over the live set.

CREATE TABLE ipn_worker (
    worker_id    text        PRIMARY KEY,
    host         text        NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);
