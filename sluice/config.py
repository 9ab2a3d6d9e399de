"""Settings, one frozen class per external system, read from the environment once at entry.

Every variable starts with ``SLUICE_``. Library code receives these objects; it never reads
``os.environ`` itself.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Self
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from sluice.schemas.webhooks import DEFAULT_WEBHOOK_EVENTS, check_webhook_target

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_TOPIC_PREFIX = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")
DEFAULT_TOPIC_PREFIX = "sluice"


@dataclass(frozen=True)
class Schemas:
    """The PostgreSQL schemas of one deployment (``sluice.storage.db`` puts them on every
    connection's search path)."""

    core: str = "sluice"
    """Runs, batches, the outbox, files, items, cursors."""
    atproto: str = "atproto"
    """Mirrored AT Protocol records, tombstones and repositories."""

    def __post_init__(self) -> None:
        for setting, name in (
            ("SLUICE_DATABASE_SCHEMA", self.core),
            ("SLUICE_DATABASE_ATPROTO_SCHEMA", self.atproto),
        ):
            if not _SCHEMA_NAME.fullmatch(name):
                raise ValueError(
                    f"{setting}={name!r} is not a usable schema name: use lower-case letters, "
                    "digits and _ (at most 63, not starting with a digit)"
                )
        if self.core == self.atproto:
            raise ValueError(
                "SLUICE_DATABASE_SCHEMA and SLUICE_DATABASE_ATPROTO_SCHEMA must differ"
            )


class KafkaSettings(BaseSettings):
    """The brokers, how to reach them (TLS, SASL) and the names this deployment uses on them.
    An empty bootstrap means: use the embedded stack of ``SLUICE_HOME``."""

    # hide_input_in_errors: a validation error would otherwise print every value given,
    # the SASL password and the key's pass phrase included.
    model_config = SettingsConfigDict(
        env_prefix="SLUICE_KAFKA_",
        frozen=True,
        extra="ignore",
        populate_by_name=True,
        hide_input_in_errors=True,
    )

    bootstrap: str = Field(default="", description="comma-separated host:port of brokers")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        default="PLAIN", description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (SASL protocols)"
    )
    sasl_username: str = Field(default="", description="SASL user")
    sasl_password: SecretStr = Field(default=SecretStr(""), description="SASL password")
    ssl_cafile: str = Field(
        default="", description="PEM file of the CAs to trust (default: the system's)"
    )
    ssl_certfile: str = Field(default="", description="client certificate (mutual TLS)")
    ssl_keyfile: str = Field(default="", description="the client certificate's key")
    ssl_key_password: SecretStr = Field(
        default=SecretStr(""), description="password of an encrypted client key"
    )
    ssl_check_hostname: bool = Field(
        default=True, description="check that the broker's certificate names the host"
    )
    client_id: str = Field(default="sluice", description="client id the brokers see (quotas, logs)")
    request_timeout: float = Field(
        default=30.0, gt=0, description="seconds a produce or admin request may take"
    )
    partitions: int = Field(default=4, ge=1, description="partitions of every Sluice topic")
    replication: int = Field(default=1, ge=1, description="replication factor of new topics")
    # Our own bound: Tansu does not check message.max.bytes, real Kafka rejects above ~1 MB.
    max_message_bytes: int = Field(
        default=900_000, ge=10_000, description="largest message produced (the client refuses more)"
    )
    session_timeout: float = Field(
        default=10.0, gt=0, description="seconds before a silent consumer leaves its group"
    )
    fetch_max_wait_ms: int = Field(
        default=100,
        ge=1,
        le=30_000,
        description="how long a worker's fetch waits at the broker for new records (a broker"
        " that answers a waiting fetch only then, as the embedded one does, makes it each"
        " stage's delay)",
    )
    topic_prefix: str = Field(
        default=DEFAULT_TOPIC_PREFIX,
        validation_alias=AliasChoices("SLUICE_TOPIC_PREFIX", "topic_prefix"),
        description="every topic is <prefix>.<name>, e.g. sluice.requests",
    )
    group_id: str = Field(
        default="sluice",
        validation_alias=AliasChoices("SLUICE_GROUP_ID", "group_id"),
        description="consumer group of the workers (others derive from it)",
    )

    @field_validator("topic_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not _TOPIC_PREFIX.fullmatch(value) or value.endswith("."):
            raise ValueError(
                f"SLUICE_TOPIC_PREFIX={value!r} cannot start Kafka topic names: use letters, "
                "digits, '.', '_' and '-' (at most 200, not ending with '.')"
            )
        return value

    @field_validator("group_id")
    @classmethod
    def _check_group(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("SLUICE_GROUP_ID must not be empty")
        return value

    @model_validator(mode="after")
    def _check_security(self) -> Self:
        if self.uses_sasl and not self.sasl_username:
            raise ValueError(
                f"SLUICE_KAFKA_SECURITY_PROTOCOL={self.security_protocol} needs "
                "SLUICE_KAFKA_SASL_USERNAME and SLUICE_KAFKA_SASL_PASSWORD"
            )
        if self.ssl_keyfile and not self.ssl_certfile:
            raise ValueError("SLUICE_KAFKA_SSL_KEYFILE needs SLUICE_KAFKA_SSL_CERTFILE")
        return self

    @property
    def bootstrap_servers(self) -> list[str]:
        return [s.strip() for s in self.bootstrap.split(",") if s.strip()]

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")


class DatabaseSettings(BaseSettings):
    """PostgreSQL. Empty url means: use the embedded stack of ``SLUICE_HOME``."""

    # The URL holds the password: keep the values out of validation errors.
    model_config = SettingsConfigDict(
        env_prefix="SLUICE_DATABASE_",
        frozen=True,
        extra="ignore",
        populate_by_name=True,
        hide_input_in_errors=True,
    )

    url: SecretStr = Field(
        default=SecretStr(""),
        description="postgresql://user:password@host:port/db (empty: the embedded stack's)",
    )
    pool_min: int = Field(default=1, ge=0, description="connections a pool keeps open")
    pool_max: int = Field(default=8, ge=1, description="connections a pool opens at most")
    core_schema: str = Field(
        default="sluice",
        validation_alias=AliasChoices("SLUICE_DATABASE_SCHEMA", "core_schema"),
        description="schema of Sluice's own tables (runs, batches, outbox, files)",
    )
    atproto_schema: str = Field(
        default="atproto",
        description="schema of the mirrored AT Protocol records, tombstones and repos",
    )

    @model_validator(mode="after")
    def _check_schemas(self) -> Self:
        self.schemas  # noqa: B018 - validates the names
        return self

    @property
    def schemas(self) -> Schemas:
        return Schemas(core=self.core_schema, atproto=self.atproto_schema)


DEFAULT_TOKEN_NAME = "api"
"""The name of an API token given without one (``SLUICE_API_TOKEN=secret``)."""
_TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


@dataclass(frozen=True)
class ApiToken:
    """One API token and the name runs started with it record as ``requested_by``."""

    name: str
    secret: SecretStr


def parse_api_token(entry: str, setting: str) -> ApiToken:
    """``name:secret``, or a bare ``secret`` (named ``api``). Everything before the first
    ``:`` is the name, so a secret that holds a ``:`` needs a name in front of it. Errors
    name the setting and never quote the secret."""
    entry = entry.strip()
    if ":" not in entry:
        return ApiToken(DEFAULT_TOKEN_NAME, SecretStr(entry))
    name, _, secret = entry.partition(":")
    name, secret = name.strip(), secret.strip()
    if not _TOKEN_NAME.fullmatch(name):
        raise ValueError(
            f"{setting}: an entry's name (before the ':') must be 1-64 letters, digits and "
            "'_.@-', starting with a letter or digit; write name:token (a token holding a "
            "':' needs a name in front of it)"
        )
    if not secret:
        raise ValueError(f"{setting}: the token named {name!r} is empty; write name:token")
    return ApiToken(name, SecretStr(secret))


class ApiSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_API_", frozen=True, extra="ignore")

    host: str = Field(default="127.0.0.1", description="address `sluice api` listens on")
    port: int = Field(default=8000, description="port `sluice api` listens on")
    url: str = Field(default="", description="where clients reach the API (for `sluice env`)")
    token: SecretStr = Field(default=SecretStr(""), description="a token, bare or as name:token")
    tokens: SecretStr = Field(
        default=SecretStr(""),
        description="more tokens, comma-separated, each bare or name:token (one per client, "
        "rotation); runs started with one record its name as requested_by",
    )
    max_upload_bytes: int = Field(default=2 * 2**30, description="largest upload accepted")
    public_health: bool = Field(default=True, description="/healthz and /readyz without a token")
    public_metrics: bool = Field(default=False, description="/metrics without a token")
    wait_timeout: float = Field(default=60.0, gt=0, description="longest ?wait=true, in seconds")
    rate_limit: float = Field(
        default=50.0,
        ge=0,
        description="requests per second per API token (per address without one); 0: no limit",
    )
    rate_burst: int = Field(
        default=100, ge=1, description="requests a client may send at once, above the rate"
    )
    header_timeout: float = Field(
        default=30.0,
        gt=0,
        description="seconds a connection has to send a request's line and headers (else 408)",
    )
    body_timeout: float = Field(
        default=60.0,
        gt=0,
        description="seconds without a byte of a request body before it is cut off (408)",
    )

    @model_validator(mode="after")
    def _check_tokens(self) -> Self:
        self.named_tokens()
        return self

    def named_tokens(self) -> list[ApiToken]:
        """Every token with its name, ``SLUICE_API_TOKEN`` first; the same token given twice
        under one name counts once, under two names is an error."""
        entries = [("SLUICE_API_TOKEN", self.token.get_secret_value())] + [
            ("SLUICE_API_TOKENS", entry) for entry in self.tokens.get_secret_value().split(",")
        ]
        found: dict[str, ApiToken] = {}
        for setting, entry in entries:
            if not entry.strip():
                continue
            token = parse_api_token(entry, setting)
            seen = found.setdefault(token.secret.get_secret_value(), token)
            if seen.name != token.name:
                raise ValueError(
                    f"SLUICE_API_TOKEN(S) give one token two names ({seen.name!r} and "
                    f"{token.name!r}); a token has one name"
                )
        return list(found.values())

    def all_tokens(self) -> list[str]:
        """The tokens' secrets, ``SLUICE_API_TOKEN``'s first."""
        return [t.secret.get_secret_value() for t in self.named_tokens()]


def find_home(start: Path | None = None) -> Path:
    """The default ``SLUICE_HOME``: the nearest ``.sluice`` folder in ``start`` (the current
    folder) or one of its parents, so commands run from a subfolder of the project find the
    stack started at its top; ``./.sluice`` when there is none."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / ".sluice").is_dir():
            return folder / ".sluice"
    return Path(".sluice")


class PipelineSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_", frozen=True, extra="ignore")

    home: Path = Field(
        default_factory=lambda: find_home(),
        description="the embedded stack's folder (data, logs, stack.json); by default the"
        " nearest .sluice folder in this folder or a parent (as git finds .git), else ./.sluice",
        json_schema_extra={"shown_default": ".sluice"},
    )
    importers: str = Field(
        default="",
        description="comma-separated module paths that define importers (besides the bundled ones)",
    )
    batch_size: int = Field(
        default=5000, ge=1, le=50_000, description="rows per batch (importers may set their own)"
    )
    copy_batches: bool = Field(
        default=True,
        description="send rows of text as COPY batches (off while workers older than them run)",
    )
    split_processes: int = Field(
        default=0,
        ge=0,
        description="processes that read a large delimited file's byte ranges in parallel"
        " (0: one per core; 1: none, the split reads every range itself)",
    )
    split_range_bytes: int = Field(
        default=8 << 20,
        ge=0,
        description="bytes per range of a delimited file read in parallel (0: files are read"
        " from start to end by the split alone); a file is cut so when larger than two ranges",
    )
    apply_attempts: int = Field(default=5, ge=1, description="tries of a batch before dead-letter")
    progress_interval: float = Field(
        default=1.0, gt=0, description="seconds between a run's progress events"
    )
    relay_interval: float = Field(
        default=0.2, gt=0, description="seconds between outbox relays to the lifecycle topic"
    )
    file_chunk_bytes: int = Field(default=1 << 20, description="bytes per stored file chunk")
    # Retention: workers prune on this schedule, `sluice prune-files` / `prune-rows` on demand.
    file_retention_hours: float = Field(default=24.0, gt=0, description="stored files of runs")
    run_retention_days: float = Field(default=30.0, gt=0, description="finished runs, row logs")
    prune_interval: float = Field(default=3600.0, gt=0, description="seconds between prunes")
    stall_timeout: float = Field(
        default=120.0, gt=0, description="seconds without change before a run is resumed"
    )
    recovery_interval: float = Field(default=15.0, gt=0, description="seconds between checks")
    topic_check_interval: float = Field(
        default=2.0,
        gt=0,
        description="seconds between checks that the broker still has the topics (a broker "
        "that lost them gets them back and the runs in flight are resumed at once)",
    )
    max_recoveries: int = Field(default=5, ge=0, description="resumptions before a run fails")
    schedule_interval: float = Field(default=1.0, gt=0, description="seconds between ticks")
    schedule_grace: float = Field(
        default=60.0, gt=0, description="a scheduled time later than this is not fired"
    )
    file_roots: str = Field(
        default="",
        description="folders (separated by ':') that filesystem sources may read from",
    )

    @property
    def roots(self) -> tuple[Path, ...]:
        return tuple(Path(p) for p in self.file_roots.split(":") if p.strip())


_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
S3_MIN_PART_BYTES = 5 * 2**20
"""S3's smallest part of a multipart upload (all but the last)."""


class FileStoreSettings(BaseSettings):
    """Where stored files go (``SLUICE_FILE_STORE``) and how to reach the S3-compatible object
    store. The connection settings are used to read objects whatever this process writes to:
    a worker that stores in PostgreSQL still reads a file another process put in S3."""

    model_config = SettingsConfigDict(
        env_prefix="SLUICE_S3_", frozen=True, extra="ignore", populate_by_name=True
    )

    store: str = Field(
        default="",
        validation_alias=AliasChoices("SLUICE_FILE_STORE", "store"),
        description="s3://bucket/prefix to store files as objects, file:///directory to keep "
        "them on this machine's disk (the embedded stack's default); empty: in PostgreSQL",
    )
    endpoint_url: str = Field(
        default="", description="the S3 API's URL (MinIO, Ceph, R2, ...); empty: AWS"
    )
    region: str = Field(default="", description="empty: the standard credential chain's")
    access_key_id: str = Field(
        default="", description="empty: the standard credential chain (AWS_*, profile, role)"
    )
    secret_access_key: SecretStr = SecretStr("")
    session_token: SecretStr = SecretStr("")
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        default="auto", description="path: http://host/bucket/key (most self-hosted stores)"
    )
    part_bytes: int = Field(
        default=8 * 2**20,
        ge=S3_MIN_PART_BYTES,
        le=5 * 2**30,
        description="bytes per multipart upload part, held in memory while it is sent",
    )

    @field_validator("store")
    @classmethod
    def _check_store(cls, value: str) -> str:
        value = value.strip()
        if not value:
            return value
        scheme, sep, rest = value.partition("://")
        if scheme == "file" and sep:
            if not rest.startswith("/") or rest.strip("/") == "":
                raise ValueError(
                    f"SLUICE_FILE_STORE={value!r} names no directory: write file:// and the "
                    "directory's absolute path, for example file:///var/lib/sluice/files"
                )
            return value
        bucket = rest.split("/", 1)[0]
        if scheme != "s3" or not sep or not _BUCKET_NAME.fullmatch(bucket):
            raise ValueError(
                f"SLUICE_FILE_STORE={value!r} is not a file store location: write "
                "s3://BUCKET or s3://BUCKET/PREFIX (bucket names: 3-63 lower-case letters, "
                "digits, '.' and '-'), file:///DIRECTORY for a directory on this machine, or "
                "leave it empty to store files in PostgreSQL"
            )
        return value

    @model_validator(mode="after")
    def _check_keys(self) -> Self:
        if bool(self.access_key_id) != bool(self.secret_access_key.get_secret_value()):
            raise ValueError(
                "set SLUICE_S3_ACCESS_KEY_ID and SLUICE_S3_SECRET_ACCESS_KEY together, or "
                "neither to use the standard AWS credential chain"
            )
        return self

    @property
    def uses_s3(self) -> bool:
        return self.store.startswith("s3://")

    @property
    def directory(self) -> Path | None:
        """The directory of ``file:///DIRECTORY``; None for the other stores."""
        if not self.store.startswith("file://"):
            return None
        return Path(self.store.removeprefix("file://"))

    @property
    def bucket(self) -> str:
        return self.store.partition("://")[2].split("/", 1)[0]

    @property
    def prefix(self) -> str:
        """The key prefix of new objects, '' or ending with '/'."""
        rest = self.store.partition("://")[2].partition("/")[2].strip("/")
        return f"{rest}/" if rest else ""


class UrlSettings(BaseSettings):
    """What URL sources may fetch (SSRF guard) and how much."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_URL_", frozen=True, extra="ignore")

    allow_hosts: str = Field(
        default="",
        description="comma-separated hosts, IPs or CIDRs; when set, URL sources, API sources "
        "and the backfill reach only these (even private ones)",
    )
    deny_hosts: str = Field(
        default="", description="comma-separated hosts, IPs or CIDRs that are always refused"
    )
    allow_private: bool = Field(
        default=False,
        description="allow loopback, private, link-local and metadata addresses",
    )
    max_bytes: int = Field(
        default=2 * 2**30,
        ge=1,
        description="largest body a URL source fetches; also the largest answer read from an "
        "API source or a PDS",
    )
    connect_timeout: float = Field(default=10.0, gt=0, description="seconds to connect")
    read_timeout: float = Field(default=60.0, gt=0, description="seconds without a byte")
    max_redirects: int = Field(default=5, ge=0, description="redirects followed, each checked")

    @staticmethod
    def _split(raw: str) -> tuple[str, ...]:
        return tuple(h.strip().lower() for h in raw.split(",") if h.strip())

    @property
    def allowed(self) -> tuple[str, ...]:
        return self._split(self.allow_hosts)

    @property
    def denied(self) -> tuple[str, ...]:
        return self._split(self.deny_hosts)


class FirehoseSettings(BaseSettings):
    """The AT Protocol firehose (a Jetstream-compatible WebSocket) and the backfill."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_FIREHOSE_", frozen=True, extra="ignore")

    url: str = Field(
        default="wss://jetstream2.us-east.bsky.network/subscribe",
        description="Jetstream WebSocket URL",
    )
    collections: str = Field(default="", description="comma-separated NSIDs (empty: all)")
    dids: str = Field(default="", description="comma-separated DIDs (empty: all)")
    enabled: bool = Field(default=False, description="workers run the consumer (one at a time)")
    name: str = Field(default="default", description="the consumer's name: its stored cursor")
    rewind: float = Field(default=5.0, ge=0, description="seconds to go back when resuming")
    cursor_interval: float = Field(default=1.0, gt=0, description="seconds between cursor saves")
    linger_ms: int = Field(
        default=50,
        ge=0,
        le=1000,
        description="milliseconds the consumer gathers events into one Kafka batch (fewer "
        "batches: less CPU per event, and on Tansu a broker CPU that grows far slower)",
    )
    plc_url: str = Field(default="https://plc.directory", description="did:plc directory")
    did_web_url: str = Field(
        default="https://{host}/.well-known/did.json",
        description="where a did:web document is; {host} is the DID's host",
    )
    page_limit: int = Field(default=100, ge=1, le=100, description="listRecords page size")
    page_delay: float = Field(default=0.0, ge=0, description="seconds between listRecords pages")
    per_pds: int = Field(default=4, ge=1, description="repositories backfilled at once per PDS")
    max_attempts: int = Field(default=5, ge=1, description="tries of a PDS request (not 429s)")
    pds_rate: float = Field(default=20.0, gt=0, description="requests per second to one PDS")
    freshness: float = Field(
        default=10.0,
        gt=0,
        description="a backfill starts only when a firehose consumer covering it heard from "
        "its server (a frame, or the answer to a ping) this recently and has saved a cursor",
    )

    @staticmethod
    def split(raw: str) -> tuple[str, ...]:
        return tuple(x.strip() for x in raw.split(",") if x.strip())


class MetricsSettings(BaseSettings):
    """Where a worker (and ``sluice firehose``) serves its Prometheus metrics."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_METRICS_", frozen=True, extra="ignore")

    host: str = Field(default="127.0.0.1", description="address /metrics is served on")
    port: int = Field(
        default=9464,
        ge=0,
        le=65535,
        description="port /metrics is served on; 0 turns the worker's metrics off",
    )
    lag_interval: float = Field(
        default=5.0, gt=0, description="seconds between updates of the consumer lag gauges"
    )


class WebhookTarget(BaseModel):
    """One entry of ``SLUICE_WEBHOOKS``: a URL and the lifecycle events it receives."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str
    events: tuple[str, ...] = DEFAULT_WEBHOOK_EVENTS
    importers: tuple[str, ...] | None = Field(
        default=None, description="only runs of these importers; None means every importer"
    )
    secret_env: str | None = Field(
        default=None,
        description="environment variable holding this hook's secret, instead of the default",
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        check_webhook_target(self.url, self.events)
        return self


class WebhookSettings(BaseSettings):
    """Webhooks for run lifecycle events (docs/webhooks.md)."""

    model_config = SettingsConfigDict(
        env_prefix="SLUICE_WEBHOOK_", frozen=True, extra="ignore", populate_by_name=True
    )

    hooks: tuple[WebhookTarget, ...] = Field(
        default=(),
        validation_alias="SLUICE_WEBHOOKS",
        description="JSON list of hooks for every importer (importers may declare more)",
    )
    secret: SecretStr = Field(
        default=SecretStr(""), description="signs every hook that names no secret_env"
    )
    max_attempts: int = Field(default=8, ge=1, description="tries of a delivery")
    backoff: float = Field(default=1.0, gt=0, description="seconds before the first retry")
    backoff_max: float = Field(default=300.0, gt=0, description="the doubling stops here")
    timeout: float = Field(default=10.0, gt=0, description="seconds for a whole request")
    retry_interval: float = Field(default=1.0, gt=0, description="how often retries are due")
    # The lifecycle topic keeps its history: a worker that consumes it for the first time must
    # not call today's hooks for last month's runs.
    max_event_age: float = Field(
        default=3600.0, gt=0, description="seconds; older events are not delivered"
    )


class Settings:
    """All settings together, built once in an entry point."""

    def __init__(
        self,
        kafka: KafkaSettings | None = None,
        database: DatabaseSettings | None = None,
        api: ApiSettings | None = None,
        pipeline: PipelineSettings | None = None,
        webhooks: WebhookSettings | None = None,
        url: UrlSettings | None = None,
        firehose: FirehoseSettings | None = None,
        files: FileStoreSettings | None = None,
        metrics: MetricsSettings | None = None,
    ) -> None:
        self.kafka = kafka or KafkaSettings()
        self.database = database or DatabaseSettings()
        self.api = api or ApiSettings()
        self.pipeline = pipeline or PipelineSettings()
        self.webhooks = webhooks or WebhookSettings()
        self.url = url or UrlSettings()
        self.firehose = firehose or FirehoseSettings()
        self.files = files or FileStoreSettings()
        self.metrics = metrics or MetricsSettings()

    @property
    def database_url(self) -> str:
        return self.database.url.get_secret_value()

    @staticmethod
    def parts() -> tuple[type[BaseSettings], ...]:
        """The settings classes, in the order ``sluice config`` shows them."""
        return (
            KafkaSettings,
            DatabaseSettings,
            ApiSettings,
            PipelineSettings,
            UrlSettings,
            FirehoseSettings,
            WebhookSettings,
        )

    def components(self) -> list[BaseSettings]:
        return [
            self.kafka,
            self.database,
            self.api,
            self.pipeline,
            self.url,
            self.firehose,
            self.webhooks,
        ]


@dataclass(frozen=True)
class SettingRow:
    """One setting as ``sluice config`` and the README show it."""

    env: str
    value: str
    default: str
    description: str
    secret: bool


MASK = "**********"


def env_name(cls: type[BaseSettings], field: str) -> str:
    """The environment variable a settings field is read from."""
    info = cls.model_fields[field]
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        first = alias.choices[0]
        if isinstance(first, str):
            return first
    if isinstance(alias, str):
        return alias
    prefix = cls.model_config.get("env_prefix", "")
    return f"{prefix}{field}".upper()


def _shown(value: object, secret: bool) -> str:
    if isinstance(value, SecretStr):
        raw = value.get_secret_value()
        if not raw:
            return ""
        return _mask_url(raw) if "://" in raw else MASK
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    if isinstance(value, tuple | list):
        items = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
        return json.dumps(items) if items else ""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _mask_url(url: str) -> str:
    """A URL with its password masked (the rest helps tell which server it is)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", f":{MASK}@", 1)
    return parts._replace(netloc=netloc).geturl()


def setting_rows(settings: Settings) -> list[SettingRow]:
    """Every setting with its effective value (secrets masked) and its default."""
    rows = []
    for part in settings.components():
        cls = type(part)
        for name, info in cls.model_fields.items():
            extra = info.json_schema_extra
            shown = extra.get("shown_default") if isinstance(extra, dict) else None
            default = shown if shown is not None else info.get_default(call_default_factory=True)
            secret = info.annotation is SecretStr
            rows.append(
                SettingRow(
                    env=env_name(cls, name),
                    value=_shown(getattr(part, name), secret),
                    default=_shown(default, secret),
                    description=info.description or "",
                    secret=secret,
                )
            )
    return rows


def settings_markdown() -> str:
    """The table of every setting with its default, for the README (``sluice config
    --markdown``; a test keeps the README's copy current)."""
    lines = ["| setting | default | what |", "|---|---|---|"]
    for row in setting_rows(Settings()):
        default = f"`{row.default}`".replace("|", "\\|") if row.default else ""
        what = row.description.replace("|", "\\|")
        lines.append(f"| `{row.env}` | {default} | {what} |")
    return "\n".join(lines) + "\n"
