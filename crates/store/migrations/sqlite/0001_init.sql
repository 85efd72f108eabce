-- SCIM resources: the whole canonical JSON plus the columns filters and uniqueness need.
CREATE TABLE users (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    id             TEXT    NOT NULL UNIQUE,
    user_name      TEXT    NOT NULL,
    user_name_ci   TEXT    NOT NULL UNIQUE,   -- case-folded: userName is caseExact=false
    external_id    TEXT,
    active         INTEGER NOT NULL,
    created        TEXT    NOT NULL,          -- fixed-width UTC RFC 3339, sorts chronologically
    last_modified  TEXT    NOT NULL,
    version        INTEGER NOT NULL,
    data           TEXT    NOT NULL
);
CREATE INDEX users_external_id ON users (external_id);
CREATE INDEX users_last_modified ON users (last_modified);

CREATE TABLE groups (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT    NOT NULL UNIQUE,
    display_name     TEXT    NOT NULL,
    display_name_ci  TEXT    NOT NULL UNIQUE,
    external_id      TEXT,
    created          TEXT    NOT NULL,
    last_modified    TEXT    NOT NULL,
    version          INTEGER NOT NULL,
    data             TEXT    NOT NULL
);
CREATE INDEX groups_external_id ON groups (external_id);
CREATE INDEX groups_last_modified ON groups (last_modified);

-- Group membership is rows: adding one member to a 50,000-member group touches one row.
CREATE TABLE group_members (
    group_id     TEXT NOT NULL,
    member_id    TEXT NOT NULL,
    member_type  TEXT NOT NULL,               -- 'User' | 'Group'
    display      TEXT,                        -- as the client sent it, if it did
    PRIMARY KEY (group_id, member_id)
) WITHOUT ROWID;
CREATE INDEX group_members_member ON group_members (member_id, group_id);

-- SCIM bearer tokens: only the SHA-256 of the secret is kept.
CREATE TABLE api_tokens (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    hash        BLOB NOT NULL UNIQUE,
    created     TEXT NOT NULL,
    expires     TEXT,
    revoked     TEXT
);

-- Append-only, hash-chained audit trail. Written only inside store commands.
CREATE TABLE audit_events (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    time           TEXT NOT NULL,
    actor          TEXT NOT NULL,
    request_id     TEXT,
    resource_type  TEXT NOT NULL,
    resource_id    TEXT,
    operation      TEXT NOT NULL,
    outcome        TEXT NOT NULL,
    status         INTEGER,
    detail         TEXT NOT NULL,             -- canonical JSON; never tokens, passwords or emails
    prev_hash      TEXT NOT NULL,
    hash           TEXT NOT NULL
);

-- Transactional outbox: one row per changed entity, written with the change itself.
CREATE TABLE outbox (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    entity_type      TEXT NOT NULL,           -- 'user' | 'group'
    entity_id        TEXT NOT NULL,
    operation        TEXT NOT NULL,           -- 'upsert' | 'delete' | 'members'
    detail           TEXT NOT NULL,
    audit_seq        INTEGER NOT NULL,
    created          TEXT NOT NULL,
    state            TEXT NOT NULL DEFAULT 'pending',
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TEXT NOT NULL,
    lease_until      TEXT,
    last_error       TEXT
);
CREATE INDEX outbox_pending ON outbox (state, next_attempt_at);
CREATE INDEX outbox_entity ON outbox (entity_type, entity_id);
