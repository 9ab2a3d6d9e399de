"""The Kafka contract: topic names, partitioning and codecs."""
