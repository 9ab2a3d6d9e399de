-- Times the broker lost the deployment's topics (recorded by the worker that recreated them).
-- Lifecycle subscribers watch this table: after a loss they read the new topics from the start
-- and take what they may have missed from the outbox (sluice.events).
CREATE TABLE sluice.topic_losses (
    id          bigserial PRIMARY KEY,
    topics      text[] NOT NULL,
    -- The last time the topics were seen whole: messages sent after it may be lost.
    seen_whole  timestamptz,
    detected_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX events_created_idx ON sluice.events (created_at);
