"""Your importers, for the Docker image: see README.md in this folder."""
