-- The PostgreSQL schema: the SQLite schema (migrations/sqlite/0001..0004) in one step.
--
-- Same columns, same meaning. Timestamps stay TEXT in the fixed-width UTC form of
-- `store::timefmt`, and every text column is COLLATE "C" (byte order, as SQLite's BINARY), so
-- comparisons, ordering and the SQL filter behave exactly as on SQLite. JSON stays TEXT (the
-- stored text is what the audit chain and the outbox hand on).

-- SCIM resources: the whole canonical JSON plus the columns filters and uniqueness need.
CREATE TABLE users (
    seq            BIGSERIAL PRIMARY KEY,
    id             TEXT COLLATE "C" NOT NULL UNIQUE,
    user_name      TEXT COLLATE "C" NOT NULL,
    user_name_ci   TEXT COLLATE "C" NOT NULL UNIQUE,   -- case-folded: userName is caseExact=false
    external_id    TEXT COLLATE "C",
    active         BIGINT NOT NULL,                    -- 0/1, as in SQLite
    created        TEXT COLLATE "C" NOT NULL,          -- fixed-width UTC RFC 3339
    last_modified  TEXT COLLATE "C" NOT NULL,
    version        BIGINT NOT NULL,
    data           TEXT NOT NULL
);
CREATE INDEX users_external_id ON users (external_id);
CREATE INDEX users_last_modified ON users (last_modified);

CREATE TABLE groups (
    seq              BIGSERIAL PRIMARY KEY,
    id               TEXT COLLATE "C" NOT NULL UNIQUE,
    display_name     TEXT COLLATE "C" NOT NULL,
    display_name_ci  TEXT COLLATE "C" NOT NULL UNIQUE,
    external_id      TEXT COLLATE "C",
    created          TEXT COLLATE "C" NOT NULL,
    last_modified    TEXT COLLATE "C" NOT NULL,
    version          BIGINT NOT NULL,
    data             TEXT NOT NULL
);
CREATE INDEX groups_external_id ON groups (external_id);
CREATE INDEX groups_last_modified ON groups (last_modified);

-- Group membership is rows.
CREATE TABLE group_members (
    group_id     TEXT COLLATE "C" NOT NULL,
    member_id    TEXT COLLATE "C" NOT NULL,
    member_type  TEXT NOT NULL,                        -- 'User' | 'Group'
    display      TEXT,
    PRIMARY KEY (group_id, member_id)
);
CREATE INDEX group_members_member ON group_members (member_id, group_id);

-- Bearer tokens: only the SHA-256 of the secret is kept.
CREATE TABLE api_tokens (
    id          TEXT COLLATE "C" PRIMARY KEY,
    name        TEXT NOT NULL,
    hash        BYTEA NOT NULL UNIQUE,
    created     TEXT COLLATE "C" NOT NULL,
    expires     TEXT COLLATE "C",
    revoked     TEXT COLLATE "C",
    scope       TEXT NOT NULL DEFAULT 'scim'
);

-- Append-only, hash-chained audit trail. seq is assigned by the writer from audit_head.
CREATE TABLE audit_events (
    seq            BIGINT PRIMARY KEY,
    time           TEXT COLLATE "C" NOT NULL,
    actor          TEXT NOT NULL,
    request_id     TEXT,
    resource_type  TEXT NOT NULL,
    resource_id    TEXT,
    operation      TEXT NOT NULL,
    outcome        TEXT NOT NULL,
    status         BIGINT,
    detail         TEXT NOT NULL,
    prev_hash      TEXT NOT NULL,
    hash           TEXT NOT NULL
);
CREATE INDEX audit_events_time ON audit_events (time);

-- The chain head: exactly one row. Every audited write transaction locks it
-- (SELECT ... FOR UPDATE) before anything else, so writers from any number of processes
-- append to one chain with gap-free seq, one after another.
CREATE TABLE audit_head (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    seq   BIGINT NOT NULL,
    hash  TEXT NOT NULL
);
INSERT INTO audit_head (id, seq, hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');

-- Transactional outbox.
CREATE TABLE outbox (
    id               BIGSERIAL PRIMARY KEY,
    entity_type      TEXT COLLATE "C" NOT NULL,
    entity_id        TEXT COLLATE "C" NOT NULL,
    operation        TEXT NOT NULL,
    detail           TEXT NOT NULL,
    audit_seq        BIGINT NOT NULL,
    created          TEXT COLLATE "C" NOT NULL,
    state            TEXT NOT NULL DEFAULT 'pending',
    attempts         BIGINT NOT NULL DEFAULT 0,
    next_attempt_at  TEXT COLLATE "C" NOT NULL,
    lease_until      TEXT COLLATE "C",
    last_error       TEXT,
    leased_by        TEXT,
    dead_reason      TEXT,
    held_batch_id    BIGINT,
    finished         TEXT COLLATE "C"
);
CREATE INDEX outbox_pending ON outbox (state, next_attempt_at);
CREATE INDEX outbox_entity ON outbox (entity_type, entity_id);

CREATE TABLE mappings (
    kind           TEXT COLLATE "C" NOT NULL,
    scim_id        TEXT COLLATE "C" NOT NULL,
    teamcity_id    TEXT COLLATE "C" NOT NULL,
    teamcity_name  TEXT NOT NULL,
    updated        TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (kind, scim_id)
);
CREATE INDEX mappings_teamcity ON mappings (kind, teamcity_id);

CREATE TABLE held_batches (
    id          BIGSERIAL PRIMARY KEY,
    created     TEXT COLLATE "C" NOT NULL,
    source      TEXT NOT NULL,
    outbox_ids  TEXT NOT NULL,
    summary     TEXT NOT NULL,
    removals    BIGINT NOT NULL,
    plan        TEXT NOT NULL,
    state       TEXT NOT NULL DEFAULT 'held',
    decided_at  TEXT COLLATE "C",
    decided_by  TEXT
);
CREATE INDEX held_batches_state ON held_batches (state, id);

CREATE TABLE policy_pins (
    rule       TEXT COLLATE "C" PRIMARY KEY,
    group_id   TEXT NOT NULL,
    pinned_at  TEXT NOT NULL
);

CREATE TABLE sync_state (
    key    TEXT COLLATE "C" PRIMARY KEY,
    value  TEXT NOT NULL
);

CREATE TABLE audit_checkpoints (
    id            BIGSERIAL PRIMARY KEY,
    created       TEXT NOT NULL,
    last_seq      BIGINT NOT NULL,
    last_hash     TEXT NOT NULL,
    last_time     TEXT NOT NULL,
    pruned        BIGINT NOT NULL,
    total_pruned  BIGINT NOT NULL,
    snapshot      TEXT NOT NULL,
    signature     TEXT NOT NULL
);
