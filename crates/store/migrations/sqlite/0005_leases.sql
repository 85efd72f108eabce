-- Leases: one holder at a time for work that must not run twice at once (the reconcile).
-- `epoch` moves on whenever the lease changes hands; every write of the holder checks holder,
-- epoch and expiry in its own transaction (store::Fence).
CREATE TABLE leases (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    epoch       INTEGER NOT NULL,
    expires_at  TEXT NOT NULL        -- fixed-width UTC RFC 3339
);
