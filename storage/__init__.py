"""PostgreSQL: migrations, the file store, the run repository and the upsert writer."""
