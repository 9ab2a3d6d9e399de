-- AT Protocol: records from the firehose and the backfill, tombstones, repositories, the
-- consumer's cursor and the backfill state. Revs are TIDs: compared as bytes (COLLATE "C").
CREATE SCHEMA IF NOT EXISTS atproto;

CREATE TABLE atproto.records (
    uri        text PRIMARY KEY,
    did        text NOT NULL,
    collection text NOT NULL,
    rkey       text NOT NULL,
    cid        text,
    rev        text COLLATE "C" NOT NULL,
    record     jsonb NOT NULL,
    origin     text NOT NULL CHECK (origin IN ('live', 'backfill')),
    indexed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX records_did_idx ON atproto.records (did, collection);

-- A delete leaves its rev here, so an older copy (from a backfill, a replay) cannot bring the
-- record back; a newer write (the rkey used again) still applies.
CREATE TABLE atproto.tombstones (
    uri        text PRIMARY KEY,
    did        text NOT NULL,
    rev        text COLLATE "C" NOT NULL,
    deleted_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tombstones_did_idx ON atproto.tombstones (did);

-- One row per repository seen: handle (identity events), latest rev seen, status (account
-- events: a deleted account tombstones the whole DID).
CREATE TABLE atproto.repos (
    did        text PRIMARY KEY,
    handle     text,
    rev        text COLLATE "C",
    status     text NOT NULL DEFAULT 'active',
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- The firehose consumer's resume point (NULL until its first save: live only), what it listens
-- to and a heartbeat (a backfill checks that a live consumer covers its repository before
-- reading the first page).
CREATE TABLE sluice.firehose_cursors (
    name        text PRIMARY KEY,
    time_us     bigint,
    collections text[] NOT NULL DEFAULT '{}',
    dids        text[] NOT NULL DEFAULT '{}',
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Backfill state per (did, collection): where listRecords got to, and what it did.
CREATE TABLE sluice.backfill (
    did             text NOT NULL,
    collection      text NOT NULL,
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'in_progress', 'completed', 'failed')),
    cursor          text,
    rev             text COLLATE "C",
    pds             text,
    records_synced  bigint NOT NULL DEFAULT 0,
    records_skipped bigint NOT NULL DEFAULT 0,
    records_failed  bigint NOT NULL DEFAULT 0,
    pages           integer NOT NULL DEFAULT 0,
    run_id          uuid REFERENCES sluice.runs (id) ON DELETE SET NULL,
    started_at      timestamptz,
    completed_at    timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    error           text,
    PRIMARY KEY (did, collection)
);
CREATE INDEX backfill_status_idx ON sluice.backfill (status);
