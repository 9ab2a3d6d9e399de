-- Stalled-run recovery: when a run last changed, and how often it was resumed.
ALTER TABLE sluice.runs
    ADD COLUMN activity_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN recoveries  integer NOT NULL DEFAULT 0;
CREATE INDEX runs_active_idx ON sluice.runs (activity_at) WHERE status IN ('queued', 'running');

-- Every change of a run is activity: counters, split progress, discovery pages, backfill pages.
CREATE FUNCTION sluice.touch_run() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.activity_at := now();
    RETURN NEW;
END $$;
CREATE TRIGGER runs_touch BEFORE UPDATE ON sluice.runs
    FOR EACH ROW EXECUTE FUNCTION sluice.touch_run();

-- Messages replayed from the dead-letter topic by `sluice dlq --replay`: a message is replayed
-- once, and when it fails again its new letter is not replayed in a loop.
CREATE TABLE sluice.dlq_replays (
    topic         text NOT NULL,
    payload_sha256 text NOT NULL,
    dlq_partition integer NOT NULL,
    dlq_offset    bigint NOT NULL,
    replayed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, payload_sha256)
);
