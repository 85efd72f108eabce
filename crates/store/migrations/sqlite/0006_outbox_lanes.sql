-- The outbox claim's lanes (`ClaimOrder`): scans in id order that stop at a page's end instead
-- of grouping every pending row, and `linked` — whether TeamCity had the row's entity (a stored
-- link) when the row was written — so a change to existing access (a deactivation, a
-- membership) is claimed before a first load's creations.
ALTER TABLE outbox ADD COLUMN linked INTEGER NOT NULL DEFAULT 0;
CREATE INDEX outbox_claim ON outbox (state, id);
CREATE INDEX outbox_claim_linked ON outbox (state, linked, id);
-- A claim asks, for each row, whether its entity has a row leased to someone else: one entity's
-- pending rows (without it SQLite answered from the state index, every pending row per row).
CREATE INDEX outbox_entity_state ON outbox (entity_type, entity_id, state);
