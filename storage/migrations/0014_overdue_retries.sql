-- Retry batches whose message was lost (the worker that was to send it when due died first) are
-- found by the recovery, which sends them again once they are overdue: the pending items of
-- retry batches, by when they were due.
CREATE INDEX items_retry_due_idx ON sluice.items (retry_at) WHERE status = 'pending' AND seq < 0;
