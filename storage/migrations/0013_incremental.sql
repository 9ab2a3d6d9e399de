-- Incremental API runs (ApiSource.incremental): the cursor a run listed from and the highest
-- cursor value it listed. The next run of the importer starts from the cursor_reached of the
-- last completed run; failed and cancelled runs keep theirs but are never read.
ALTER TABLE sluice.runs ADD COLUMN cursor_from jsonb;
ALTER TABLE sluice.runs ADD COLUMN cursor_reached jsonb;
CREATE INDEX runs_cursor_idx ON sluice.runs (importer, completed_at DESC)
    WHERE cursor_reached IS NOT NULL AND status IN ('completed', 'completed_with_errors');
