-- Sync bookkeeping: the outbox worker's lease/dead-letter columns, the SCIM <-> TeamCity
-- mapping, blast-radius holds, policy pins and small key/value state.

-- Outbox: who holds the lease, why an item is dead, which held batch it waits in, when it ended.
-- States: 'pending' -> 'done' | 'dead' | 'held' | 'dropped'; 'dead' -> 'pending' (outbox retry);
-- 'held' -> 'done' (approved and applied) | 'dropped'.
ALTER TABLE outbox ADD COLUMN leased_by TEXT;
ALTER TABLE outbox ADD COLUMN dead_reason TEXT;
ALTER TABLE outbox ADD COLUMN held_batch_id INTEGER;
ALTER TABLE outbox ADD COLUMN finished TEXT;

-- SCIM id <-> TeamCity object. kind 'user': teamcity_id is the TeamCity user id, teamcity_name the
-- username. kind 'group': teamcity_id is the group key, teamcity_name the group name.
CREATE TABLE mappings (
    kind           TEXT NOT NULL,             -- 'user' | 'group'
    scim_id        TEXT NOT NULL,
    teamcity_id    TEXT NOT NULL,
    teamcity_name  TEXT NOT NULL,
    updated        TEXT NOT NULL,
    PRIMARY KEY (kind, scim_id)
) WITHOUT ROWID;
CREATE INDEX mappings_teamcity ON mappings (kind, teamcity_id);

-- Batches the blast-radius guard held back until `teamcity-scim approve ID`.
CREATE TABLE held_batches (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    created     TEXT    NOT NULL,
    source      TEXT    NOT NULL,             -- 'outbox' | 'reconcile'
    outbox_ids  TEXT    NOT NULL,             -- JSON array of outbox row ids (empty for reconcile)
    summary     TEXT    NOT NULL,
    removals    INTEGER NOT NULL,             -- users who would lose access
    plan        TEXT    NOT NULL,             -- the held plan, JSON
    state       TEXT    NOT NULL DEFAULT 'held', -- 'held' | 'approved' | 'applied' | 'dropped'
    decided_at  TEXT,
    decided_by  TEXT
);
CREATE INDEX held_batches_state ON held_batches (state, id);

-- A policy rule that matched a group by displayName, pinned to that group's id at first match.
CREATE TABLE policy_pins (
    rule       TEXT PRIMARY KEY,
    group_id   TEXT NOT NULL,
    pinned_at  TEXT NOT NULL
);

-- Small sync state, e.g. the time of the last reconcile.
CREATE TABLE sync_state (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
