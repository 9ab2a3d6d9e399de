"""Settings, one frozen class per external system, read from the environment once at entry.

Every variable starts with ``SLUICE_``. Library code receives these objects; it never reads
``os.environ`` itself.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class KafkaSettings(BaseSettings):
    """The broker. Empty bootstrap means: use the embedded stack of ``SLUICE_HOME``."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_KAFKA_", frozen=True, extra="ignore")

    bootstrap: str = ""
    partitions: int = Field(default=4, ge=1, description="partitions of every Sluice topic")
    replication: int = Field(default=1, ge=1)
    # Our own bound: Tansu does not check message.max.bytes, real Kafka rejects above ~1 MB.
    max_message_bytes: int = Field(default=900_000, ge=10_000)
    session_timeout: float = Field(default=10.0, gt=0)


class DatabaseSettings(BaseSettings):
    """PostgreSQL. Empty url means: use the embedded stack of ``SLUICE_HOME``."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_DATABASE_", frozen=True, extra="ignore")

    url: SecretStr = SecretStr("")
    pool_min: int = 1
    pool_max: int = 8


class ApiSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_API_", frozen=True, extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    url: str = ""
    token: SecretStr = SecretStr("")
    max_upload_bytes: int = 2 * 2**30


class PipelineSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_", frozen=True, extra="ignore")

    home: Path = Path(".sluice")
    importers: str = Field(
        default="",
        description="comma-separated module paths that define importers (besides the bundled ones)",
    )
    batch_size: int = Field(default=5000, ge=1, le=50_000)
    apply_attempts: int = Field(default=5, ge=1, description="tries of a batch before dead-letter")
    progress_interval: float = Field(default=1.0, gt=0)
    relay_interval: float = Field(default=0.2, gt=0)
    file_chunk_bytes: int = 1 << 20


class Settings:
    """All settings together, built once in an entry point."""

    def __init__(
        self,
        kafka: KafkaSettings | None = None,
        database: DatabaseSettings | None = None,
        api: ApiSettings | None = None,
        pipeline: PipelineSettings | None = None,
    ) -> None:
        self.kafka = kafka or KafkaSettings()
        self.database = database or DatabaseSettings()
        self.api = api or ApiSettings()
        self.pipeline = pipeline or PipelineSettings()

    @property
    def database_url(self) -> str:
        return self.database.url.get_secret_value()
