-- Full refresh: the keys a fresh run imported, so that at its end the rows it did not contain
-- can be deleted (or marked deleted) in one transaction.
CREATE TABLE sluice.run_keys (
    run_id uuid NOT NULL REFERENCES sluice.runs (id) ON DELETE CASCADE,
    key    text NOT NULL,
    scope  text,
    PRIMARY KEY (run_id, key)
);
ALTER TABLE sluice.runs ADD COLUMN deleted_rows bigint NOT NULL DEFAULT 0;
