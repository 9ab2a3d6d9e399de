-- Empty period cells of an unpivoting importer with Unpivot(empty="gap"): no record is made
-- for them, and the run counts them (set by the split: a re-split sets the same total again).
ALTER TABLE sluice.runs ADD COLUMN gaps bigint NOT NULL DEFAULT 0;
