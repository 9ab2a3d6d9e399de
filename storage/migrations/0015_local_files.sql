-- Files on a local disk: store 'local' keeps a stored file's bytes in one file of a directory
-- (SLUICE_FILE_STORE=file:///path, the embedded stack's default), at object_key, its absolute
-- path. Only processes on the machine that holds that disk can read it, which is what one
-- machine's stack is; PostgreSQL and S3 stay the stores of a cluster.
ALTER TABLE sluice.files
    DROP CONSTRAINT files_store_check,
    ADD CONSTRAINT files_store_check CHECK (store IN ('postgres', 's3', 'local')),
    ADD CONSTRAINT files_local_location CHECK (store <> 'local' OR object_key IS NOT NULL);
