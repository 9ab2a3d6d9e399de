"""Sluice: an event-driven ingestion engine into PostgreSQL over Kafka."""

__version__ = "0.1.0"
