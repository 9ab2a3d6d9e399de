-- Pull sources: triggers, paginated APIs with per-item tracking, a cluster-wide rate limiter,
-- schedules.

ALTER TABLE sluice.runs
    ADD COLUMN rate_limit_hits     bigint NOT NULL DEFAULT 0,
    ADD COLUMN rate_limit_sleeps   bigint NOT NULL DEFAULT 0,
    ADD COLUMN total_sleep_seconds double precision NOT NULL DEFAULT 0,
    ADD COLUMN items_discovered    bigint NOT NULL DEFAULT 0,
    ADD COLUMN items_completed     bigint NOT NULL DEFAULT 0,
    ADD COLUMN items_failed        bigint NOT NULL DEFAULT 0,
    -- Where a pulled file came from (final URL, remote path), for `after` actions and display.
    ADD COLUMN source_location     text;

-- Discovery of a paginated API run: the page or cursor reached, so an interrupted discovery
-- resumes where it stopped. Written in the transaction that records the page's items.
CREATE TABLE sluice.discovery (
    run_id     uuid PRIMARY KEY REFERENCES sluice.runs (id) ON DELETE CASCADE,
    state      jsonb NOT NULL,
    pages      integer NOT NULL DEFAULT 0,
    items      bigint NOT NULL DEFAULT 0,
    done       boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- One row per item of a paginated API run. `seq` is the discovery page it was listed on (the
-- identity of its detail batch), `ordinal` its position in the whole listing (its row number).
CREATE TABLE sluice.items (
    run_id         uuid NOT NULL REFERENCES sluice.runs (id) ON DELETE CASCADE,
    external_id    text NOT NULL,
    seq            integer NOT NULL,
    ordinal        bigint NOT NULL,
    status         text NOT NULL DEFAULT 'pending'
                   CHECK (status IN ('pending', 'processing', 'completed', 'failed')),
    failure_count  integer NOT NULL DEFAULT 0,
    last_error     text,
    last_failed_at timestamptz,
    completed_at   timestamptz,
    metadata       jsonb NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, external_id)
);
CREATE INDEX items_page_idx ON sluice.items (run_id, seq);
CREATE INDEX items_status_idx ON sluice.items (run_id, status);

-- Token buckets shared by every worker: one row per source.
CREATE TABLE sluice.rate_limits (
    source        text PRIMARY KEY,
    tokens        double precision NOT NULL,
    updated_at    timestamptz NOT NULL,
    blocked_until timestamptz NOT NULL DEFAULT '-infinity'
);

-- Take one token: 0 when granted, else the seconds to wait before asking again. The row lock
-- serialises the workers, so the bucket holds for the whole cluster.
CREATE FUNCTION sluice.take_token(p_source text, p_rate float8, p_burst float8)
RETURNS float8 LANGUAGE plpgsql AS $$
DECLARE
    r sluice.rate_limits;
    now_ts timestamptz;
    avail float8;
BEGIN
    INSERT INTO sluice.rate_limits (source, tokens, updated_at)
    VALUES (p_source, p_burst, clock_timestamp()) ON CONFLICT DO NOTHING;
    SELECT * INTO r FROM sluice.rate_limits WHERE source = p_source FOR UPDATE;
    now_ts := clock_timestamp();
    IF r.blocked_until > now_ts THEN
        RETURN extract(epoch FROM r.blocked_until - now_ts);
    END IF;
    avail := least(p_burst, r.tokens + p_rate * extract(epoch FROM now_ts - r.updated_at));
    IF avail >= 1 THEN
        UPDATE sluice.rate_limits SET tokens = avail - 1, updated_at = now_ts
        WHERE source = p_source;
        RETURN 0;
    END IF;
    UPDATE sluice.rate_limits SET tokens = avail, updated_at = now_ts WHERE source = p_source;
    RETURN (1 - avail) / p_rate;
END $$;

-- Schedules: one row per (importer, scheduled time). The primary key is what makes exactly one
-- worker of the cluster start the run of a scheduled time.
CREATE TABLE sluice.schedule_fires (
    importer   text NOT NULL,
    fire_time  timestamptz NOT NULL,
    run_id     uuid REFERENCES sluice.runs (id) ON DELETE SET NULL,
    outcome    text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (importer, fire_time)
);

-- Operators pause and resume schedules without a deploy.
CREATE TABLE sluice.schedule_state (
    importer   text PRIMARY KEY,
    paused     boolean NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
