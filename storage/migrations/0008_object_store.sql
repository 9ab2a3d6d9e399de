-- Files out of PostgreSQL: a stored file's bytes are either 1 MiB chunks in sluice.file_chunks
-- (store 'postgres', as before) or one object in an S3-compatible store (store 's3', at
-- bucket/object_key). The metadata (size, sha256, compression, encoding) stays here either way,
-- and readers dispatch on this row whatever their own write setting.
ALTER TABLE sluice.files
    ADD COLUMN store text NOT NULL DEFAULT 'postgres' CHECK (store IN ('postgres', 's3')),
    ADD COLUMN bucket text,
    ADD COLUMN object_key text,
    -- A multipart upload under way: aborted when the row is deleted (a crashed upload, pruned).
    ADD COLUMN upload_id text,
    ADD CONSTRAINT files_object_location CHECK (
        (store = 's3') = (bucket IS NOT NULL AND object_key IS NOT NULL));
