"""Sluice's exceptions. One root; retryable and terminal failures are different types, and
the failures of the libraries underneath are mapped into this tree where Sluice meets them:
asyncpg's "cannot reach the database" at the pool (``sluice.storage.db``), httpx's failures
and the answers that may pass at the pull sources' one HTTP client
(``sluice.agents.fetch.guard``), aiokafka's at the client factory (``sluice.streams``).
``sluice.retries`` retries a TransientError and never a TerminalError.

    SluiceError
    ├── TerminalError            the input or request is wrong: retrying cannot help
    │   ├── ImporterNotFound     no importer with that slug
    │   ├── RunNotFound          no run with that id
    │   ├── RunNotCancellable    the run is already finished
    │   ├── NothingToRetry       the run rejected no rows
    │   ├── InvalidRequest       a request that cannot be carried out as given
    │   ├── StackNotFound        no broker and database configured, no stack running
    │   ├── FileTooLarge         a file over the configured size limit
    │   ├── FileGone             a stored file (or its object) is no longer there
    │   ├── MappingError         the file's columns do not fit the importer
    │   ├── NoPullSource         a trigger for an importer that cannot pull
    │   ├── FileFormatError      the file as a whole cannot be read (the parsers of
    │   │   │                    sluice.agents.split.parse)
    │   │   └── UndecodableFile  its bytes are not text in a supported encoding
    │   ├── PoisonBatch          a batches-topic message that is not a batch (also a ValueError;
    │   │                        importable from sluice.schemas.events)
    │   ├── SourceError          a pull source refused (bad URL, refused host, a 4xx)
    │   ├── InvalidConfig        the settings contradict each other (a webhook without a secret)
    │   │   └── KafkaConfigError the broker refused the TLS or SASL settings (names which)
    │   ├── EmbeddedStackMissing `sluice up` without the `embedded` extra installed
    │   ├── ObjectStoreRefused   the object store refused: no bucket, wrong keys, a bad request
    │   ├── CannotResume         a stalled run's stored file is gone (sluice.agents.recover)
    │   └── BackfillError        a repository cannot be backfilled as asked
    │                            (sluice.agents.firehose.backfill)
    └── TransientError           a dependency failed; retry with backoff (sluice.retries)
        ├── DatabaseUnavailable  PostgreSQL cannot be reached (down, restarting): waited out
        │                        without using up tries
        ├── SourceUnavailable    a pull source did not answer, or answered 408, 425, 429 or
        │                        5xx (``status``; a 429's ``retry_after`` is waited out)
        ├── KafkaUnavailable     no bootstrap server answered
        ├── StackUnreachable     the Python API could not connect to the broker or database
        ├── DeliveryFailed       the broker did not confirm messages a stage produced
        ├── ObjectStoreUnavailable  the object store did not answer, or failed (5xx)
        └── PdsUnavailable       a PDS or the DID directory did not answer; the backfill resumes
                                 (sluice.agents.firehose.backfill)

Two classifications stand beside the tree on purpose: ``sluice.storage.sql.ROW_ERRORS``,
PostgreSQL's "this row is bad" errors, on which a batch is bisected to find its bad rows
(they never leave the writer); and a serializable transaction's conflict
(``sluice.storage.db.serialization_conflict``), applied again at once. Outside the tree:
``sluice.api.errors.ApiError`` and ``BodyProblem``, HTTP answers raised inside the API's
handlers and turned into responses there; and the private ``_TransformFailed`` and
``_Inactive``, which never leave their modules.
"""

from __future__ import annotations


class SluiceError(Exception):
    """Root of Sluice's own exceptions."""


class TerminalError(SluiceError):
    """Retrying cannot help; the message says what to fix."""


class TransientError(SluiceError):
    """A dependency failed; the operation may succeed when retried."""


class ImporterNotFound(TerminalError):
    pass


class RunNotFound(TerminalError):
    pass


class RunNotCancellable(TerminalError):
    pass


class NothingToRetry(TerminalError):
    pass


class InvalidRequest(TerminalError):
    pass


class StackNotFound(TerminalError):
    pass


class FileTooLarge(TerminalError):
    pass


class FileGone(TerminalError):
    """A stored file was pruned or deleted, or its object is missing from the object store."""


class MappingError(TerminalError):
    pass


class NoPullSource(TerminalError):
    pass


class InvalidConfig(TerminalError):
    pass


class KafkaConfigError(InvalidConfig):
    """The broker answered but refused how we connect: an untrusted certificate, a client
    certificate it does not accept, a wrong password, a mechanism it does not offer."""


class EmbeddedStackMissing(TerminalError):
    """The embedded broker or PostgreSQL (the ``embedded`` extra) is not installed."""


class KafkaUnavailable(TransientError):
    """No bootstrap server answered."""


class DeliveryFailed(TransientError):
    """Messages a stage produced were refused or never confirmed by the broker: the stage's
    step is not done and is tried again."""


class ObjectStoreRefused(TerminalError):
    """The object store answered but refused: no such bucket, wrong keys, no permission."""


class ObjectStoreUnavailable(TransientError):
    """The object store did not answer, or answered with a server error."""


class DatabaseUnavailable(TransientError):
    """PostgreSQL cannot be reached (down, restarting, refusing connections): waited out
    without using up the tries of the work that needs it (sluice.retries)."""


class StackUnreachable(TransientError):
    """The Python API could not connect to the broker or the database it was given: the stack
    is not running, or the settings point elsewhere (the message says which and what to try)."""


class FileFormatError(TerminalError):
    """The file as a whole cannot be read; the message says what is wrong and what to do."""


class UndecodableFile(FileFormatError):
    """The file's bytes are not text in a supported encoding."""


class PoisonBatch(TerminalError, ValueError):
    """A message on the batches topic that is not a batch, or a batch whose rows cannot be
    decoded: it goes to the dead-letter topic (also importable from sluice.schemas.events)."""


class SourceError(TerminalError):
    """The source refused or cannot serve the request as configured (bad URL, refused host,
    wrong password, no matching file, path outside the roots): retrying cannot help."""


class SourceUnavailable(TransientError):
    """The source did not answer or failed in a way that may pass (timeout, 5xx, reset).
    ``status`` is the HTTP status of an answer that may pass (408, 425, 5xx), and
    ``retry_after`` the seconds a 429 asked to wait (sluice.retries waits them without using a
    try)."""

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
