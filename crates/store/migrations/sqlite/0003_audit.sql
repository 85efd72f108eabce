-- Audit retention: `audit export --since/--until` filter on time; pruning leaves a signed
-- checkpoint from which `audit verify` and `access-review` continue.
CREATE INDEX audit_events_time ON audit_events (time);

-- One row per prune. The newest row is where the chain now starts: the next event's prev_hash
-- is last_hash. signature = HMAC-SHA256(key, canonical JSON of every other column but id), the
-- key held outside the database ([audit] checkpoint_key_file).
CREATE TABLE audit_checkpoints (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    created       TEXT    NOT NULL,
    last_seq      INTEGER NOT NULL,           -- the last pruned event
    last_hash     TEXT    NOT NULL,           -- its hash
    last_time     TEXT    NOT NULL,           -- its time
    pruned        INTEGER NOT NULL,           -- events deleted by this prune
    total_pruned  INTEGER NOT NULL,           -- events deleted by every prune so far
    snapshot      TEXT    NOT NULL,           -- access state after last_seq (JSON), for access-review
    signature     TEXT    NOT NULL
);
