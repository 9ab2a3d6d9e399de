-- Webhook delivery log: one row per lifecycle event and URL. The unique key makes recording
-- idempotent, since the lifecycle topic delivers an event at least once.
CREATE TABLE sluice.webhook_deliveries (
    id               bigserial PRIMARY KEY,
    event_id         uuid NOT NULL,
    -- Pruning a run prunes its deliveries.
    run_id           uuid REFERENCES sluice.runs (id) ON DELETE CASCADE,
    event_type       text NOT NULL,
    url              text NOT NULL,
    payload          jsonb NOT NULL,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    last_status_code integer,
    last_error       text,
    -- While an attempt is in flight this is the end of its lease: a worker that dies mid-request
    -- leaves the row due again once the lease runs out.
    next_attempt_at  timestamptz DEFAULT now(),
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    UNIQUE (event_id, url)
);
CREATE INDEX webhook_deliveries_due_idx ON sluice.webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_status_idx ON sluice.webhook_deliveries (status, id);
CREATE INDEX webhook_deliveries_run_idx ON sluice.webhook_deliveries (run_id);
