-- Run provenance: what the run read (file, format, delimiter, encoding, header, how each column
-- was mapped), and whether the same file was imported before.
ALTER TABLE sluice.runs ADD COLUMN provenance jsonb;
CREATE INDEX runs_file_sha_idx ON sluice.runs (importer, (provenance->>'sha256'))
    WHERE status IN ('completed', 'completed_with_errors');
