-- Sluice's own state. PostgreSQL is the source of truth; Kafka is transport.
CREATE SCHEMA IF NOT EXISTS sluice;

-- Claim check: files are stored once, in chunks, and referenced by id from events.
CREATE TABLE sluice.files (
    id           uuid PRIMARY KEY,
    name         text NOT NULL,
    size         bigint NOT NULL DEFAULT 0,
    sha256       text,
    content_type text,
    compression  text,
    encoding     text,
    encoding_error text,
    complete     boolean NOT NULL DEFAULT false,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE sluice.file_chunks (
    file_id uuid NOT NULL REFERENCES sluice.files (id) ON DELETE CASCADE,
    seq     integer NOT NULL,
    data    bytea NOT NULL,
    PRIMARY KEY (file_id, seq)
);
-- Stored as sent: compressing 1 MB chunks (pglz) halves upload speed and saves little on the
-- files people import; gzip files stay gzip.
ALTER TABLE sluice.file_chunks ALTER COLUMN data SET STORAGE EXTERNAL;

CREATE TABLE sluice.runs (
    id               uuid PRIMARY KEY,
    importer         text NOT NULL,
    source           text NOT NULL,
    status           text NOT NULL DEFAULT 'queued' CHECK (status IN
                     ('queued', 'running', 'completed', 'completed_with_errors', 'failed', 'cancelled')),
    dry_run          boolean NOT NULL DEFAULT false,
    total_rows       bigint,
    processed_rows   bigint NOT NULL DEFAULT 0,
    created_rows     bigint NOT NULL DEFAULT 0,
    updated_rows     bigint NOT NULL DEFAULT 0,
    unchanged_rows   bigint NOT NULL DEFAULT 0,
    skipped_rows     bigint NOT NULL DEFAULT 0,
    failed_rows      bigint NOT NULL DEFAULT 0,
    -- While the file is still being split the total is unknown: estimate it from the rows read
    -- and the fraction of the file's bytes they came from.
    progress_percent numeric(5, 2) GENERATED ALWAYS AS (
        CASE
            WHEN status IN ('completed', 'completed_with_errors') THEN 100
            WHEN total_rows > 0 THEN least(100, round(100.0 * processed_rows / total_rows, 2))
            WHEN rows_read > 0 AND read_fraction > 0 THEN
                least(99, round((100.0 * processed_rows * read_fraction / rows_read)::numeric, 2))
            ELSE 0
        END) STORED,
    queued_at        timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    completed_at     timestamptz,
    error            text,
    parent_run_id    uuid REFERENCES sluice.runs (id) ON DELETE SET NULL,
    requested_by     text,
    file_id          uuid REFERENCES sluice.files (id) ON DELETE SET NULL,
    file_name        text,
    options          jsonb NOT NULL DEFAULT '{}',
    -- What the batches are applied to (table, columns, key, policy), fixed when the split starts.
    plan             jsonb,
    rows_read        bigint NOT NULL DEFAULT 0,
    read_fraction    real NOT NULL DEFAULT 0,
    split_done       boolean NOT NULL DEFAULT false,
    total_batches    integer,
    applied_batches  integer NOT NULL DEFAULT 0,
    last_progress_at timestamptz NOT NULL DEFAULT '-infinity'
);
CREATE INDEX runs_status_idx ON sluice.runs (status, queued_at DESC);
CREATE INDEX runs_importer_idx ON sluice.runs (importer, queued_at DESC);

-- Exactly-once effect: a batch is applied in the transaction that inserts its marker.
CREATE TABLE sluice.batches (
    run_id     uuid NOT NULL REFERENCES sluice.runs (id) ON DELETE CASCADE,
    seq        integer NOT NULL,
    rows       integer NOT NULL,
    created    integer NOT NULL DEFAULT 0,
    updated    integer NOT NULL DEFAULT 0,
    unchanged  integer NOT NULL DEFAULT 0,
    skipped    integer NOT NULL DEFAULT 0,
    failed     integer NOT NULL DEFAULT 0,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, seq)
);

-- Rejected rows with their reason; (row_number, sub) identifies a record made from a source row.
CREATE TABLE sluice.row_log (
    run_id     uuid NOT NULL REFERENCES sluice.runs (id) ON DELETE CASCADE,
    row_number bigint NOT NULL,
    sub        integer NOT NULL DEFAULT 0,
    raw        jsonb,
    reason     text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, row_number, sub)
);

-- Outbox and event log: written in the transaction that changes a run, relayed to the lifecycle
-- topic afterwards. Kept (not deleted) so a run's timeline can be shown.
CREATE TABLE sluice.events (
    id         bigserial PRIMARY KEY,
    event_id   uuid NOT NULL UNIQUE,
    run_id     uuid,
    type       text NOT NULL,
    topic      text NOT NULL,
    key        text,
    payload    jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    relayed_at timestamptz
);
CREATE INDEX events_unrelayed_idx ON sluice.events (id) WHERE relayed_at IS NULL;
CREATE INDEX events_run_idx ON sluice.events (run_id, id);
