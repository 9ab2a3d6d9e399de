-- Details item by item: an item whose fetch failed in a way that may pass is not retried in its
-- page; it moves to a retry batch of its own (a negative `seq`, numbered by the run's
-- `retry_batches`) with the time it is due again, written in the page's transaction. The run's
-- total_batches counts the retry batches too, so the run completes when they are applied.
ALTER TABLE sluice.items ADD COLUMN retry_at timestamptz;
ALTER TABLE sluice.runs ADD COLUMN retry_batches integer NOT NULL DEFAULT 0;
