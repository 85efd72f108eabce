-- Several replicas on one database.

-- Leases: one holder at a time for work that must not run twice at once (the reconcile).
-- `epoch` moves on whenever the lease changes hands; every write of the holder checks holder,
-- epoch and expiry in its own transaction (store::Fence), share-locking the row until commit.
CREATE TABLE leases (
    name        TEXT COLLATE "C" PRIMARY KEY,
    holder      TEXT COLLATE "C" NOT NULL,
    epoch       BIGINT NOT NULL,
    expires_at  TEXT COLLATE "C" NOT NULL   -- fixed-width UTC RFC 3339
);

-- The resource generation: moved on by every transaction that writes a SCIM resource (it
-- already holds this row's lock), read by every replica's lookup cache before it answers.
ALTER TABLE audit_head ADD COLUMN resource_gen BIGINT NOT NULL DEFAULT 0;
