"""Fetch: carry out a trigger. File-like sources (URL, FTP/SFTP, filesystem) are fetched into
the file store and handed to the split as an import request, exactly like an upload; a paginated
API source starts its discovery (``agents.discover``).

The trigger's offset is committed only after this returns, so a worker that dies mid-fetch
fetches again; a run that already has its file (stored before a crash) is not fetched twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from sluice.agents.deps import Deps
from sluice.agents.fetch.base import Fetched
from sluice.errors import SourceError
from sluice.schemas.events import FileRef, ImportRequested, LifecycleEvent, TriggerRequested
from sluice.schemas.importers import Importer, pull_kind
from sluice.schemas.runs import Run, RunStatus
from sluice.schemas.sources import FilesystemSource, FtpSource, UrlSource

log = logging.getLogger(__name__)

PublishRequest = Callable[[ImportRequested], Awaitable[None]]


@asynccontextmanager
async def open_source(
    deps: Deps, importer: Importer, kind: str, params: dict[str, Any]
) -> AsyncIterator[Fetched]:
    """The file a trigger names, as a stream of chunks, whatever its source."""
    pull = importer.pull
    if kind == "url":
        from sluice.agents.fetch.url import fetch_url, url_request_parts

        source = pull if isinstance(pull, UrlSource) else UrlSource()
        url, headers, auth = url_request_parts(source, params, deps.secrets)
        async with fetch_url(
            url, deps.settings.url, headers=headers, auth=auth, max_bytes=source.max_bytes
        ) as fetched:
            yield fetched
    elif kind in ("ftp", "sftp"):
        from sluice.agents.fetch.remote import open_remote

        if not isinstance(pull, FtpSource):
            raise SourceError(f"importer {importer.slug!r} has no FTP/SFTP source")
        async with open_remote(pull, params, deps.secrets) as fetched:
            yield fetched
    elif kind == "filesystem":
        from sluice.agents.fetch.filesystem import open_path

        path = params.get("path") or (pull.path if isinstance(pull, FilesystemSource) else None)
        if not path:
            raise SourceError("a filesystem trigger needs a 'path' (inside SLUICE_FILE_ROOTS)")
        async with open_path(str(path), deps.settings.pipeline.roots) as fetched:
            yield fetched
    else:
        raise SourceError(f"unknown source {kind!r}; use url, ftp, sftp, filesystem or api")


@asynccontextmanager
async def keep_alive(deps: Deps, run_id: Any) -> AsyncIterator[None]:
    """Touch the run while a long download goes on, so it is not taken for stalled."""
    runs = deps.runs
    every = deps.settings.pipeline.stall_timeout / 4

    async def beat() -> None:
        while True:
            await asyncio.sleep(every)
            await runs.touch(run_id)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.wait((task,))


async def fetch_into_store(deps: Deps, run: Run, trigger: TriggerRequested) -> FileRef:
    """Store the trigger's file (claim check) and attach it to the run."""
    importer = deps.registry.get(trigger.importer)
    files = deps.files
    if run.file_id is not None:
        ref = await files.ref(run.file_id)
        if ref is not None:
            return ref
    kind = trigger.source or run.source
    async with (
        keep_alive(deps, run.id),
        open_source(deps, importer, kind, trigger.params) as fetched,
    ):
        ref = await files.put(fetched.chunks, name=fetched.name, content_type=fetched.content_type)
    await deps.runs.attach_file(run.id, ref, fetched.location)
    log.info("run %s: fetched %s (%d bytes) from %s", run.id, ref.name, ref.size, fetched.location)
    return ref


async def adopt_trigger(deps: Deps, trigger: TriggerRequested) -> TriggerRequested:
    """A trigger produced without a run (by any Kafka producer): create its run, once per
    ``request_id``. TerminalError (unknown importer, no pull source) when it cannot start."""
    importer = deps.registry.get(trigger.importer)
    params = dict(trigger.params)
    if trigger.source is not None:
        params.setdefault("source", trigger.source)
    kind = pull_kind(importer, params)
    run = await deps.runs.create(
        run_id=trigger.run_id_for_request(),
        importer=importer.slug,
        source=kind,
        dry_run=trigger.dry_run,
        options={
            "params": trigger.params,
            **({"fresh": True} if trigger.fresh else {}),
            **({"full": True} if trigger.full else {}),
        },
        requested_by=trigger.requested_by or "kafka",
    )
    log.info("run %s created for a %s trigger produced to the topic", run.id, kind)
    return trigger.model_copy(update={"run_id": run.id, "source": kind})


async def handle_trigger(
    deps: Deps, trigger: TriggerRequested, publish: PublishRequest, discover: Any
) -> None:
    """Terminal source problems fail the run with the source's message; anything else
    propagates, to be retried by the caller."""
    runs = deps.runs
    assert trigger.run_id is not None, "adopt_trigger gives a run to run-less triggers"
    run = await runs.start(trigger.run_id)
    if run is None:
        log.info("run %s is finished or unknown; trigger ignored", trigger.run_id)
        return
    try:
        if trigger.source == "api":
            await discover(run, trigger)
            return
        ref = await fetch_into_store(deps, run, trigger)
    except SourceError as exc:
        log.warning("run %s failed: %s", run.id, exc)
        await runs.fail(run.id, f"{trigger.source} source: {exc}")
        return
    await publish(ImportRequested.for_run(run, ref))


async def after_import(deps: Deps, payload: bytes) -> str | None:
    """React to a lifecycle event: once a run pulled from FTP/SFTP completed, move or delete
    the remote file as its importer asks. Idempotent: the event may come twice."""
    try:
        event = LifecycleEvent.model_validate_json(payload)
    except ValueError:
        return None
    if event.type != "run.completed" or event.status not in (
        RunStatus.COMPLETED,
        RunStatus.COMPLETED_WITH_ERRORS,
    ):
        return None
    run = await deps.runs.get(event.run_id)
    if run is None or run.source not in ("ftp", "sftp") or run.dry_run:
        return None
    try:
        importer = deps.registry.get(run.importer)
    except Exception:
        return None
    pull = importer.pull
    if not isinstance(pull, FtpSource) or pull.after == "keep" or not run.source_location:
        return None
    from sluice.agents.fetch.remote import finish_remote

    try:
        done = await finish_remote(pull, run.source_location, deps.secrets)
    except Exception as exc:  # the import stands; the operator sees why the file stayed
        log.error("run %s: %s of %s failed: %s", run.id, pull.after, run.source_location, exc)
        return None
    log.info("run %s: %s", run.id, done)
    return done
