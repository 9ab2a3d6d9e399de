"""Importers and imports: the registered importers, an upload, a trigger (a run that pulls
its data). Either answers the queued run at once, or with ``?wait=true`` the finished run."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Body, File, Form, Query, Response, UploadFile
from pydantic import StringConstraints

from sluice.api.auth import TOKEN_REQUIRED, Caller
from sluice.api.deps import ClientDep, SettingsDep
from sluice.api.errors import ApiError
from sluice.api.models import TriggerBody
from sluice.api.uploads import safe_filename, unsupported_type
from sluice.config import Settings
from sluice.errors import InvalidRequest
from sluice.schemas.importers import ADHOC
from sluice.schemas.runs import Run
from sluice.service import Client, adhoc_options, run_options

router = APIRouter(dependencies=TOKEN_REQUIRED)

WAITED: dict[int | str, dict[str, Any]] = {
    200: {"model": Run, "description": "with ?wait=true: the finished run"}
}
Wait = Annotated[bool, Query(description="answer when the run finishes")]
DryRun = Annotated[bool, Form()]
Fresh = Annotated[
    bool,
    Form(description="full refresh: once the run completed, delete the rows it did not contain"),
]
DateFormat = Annotated[
    list[Annotated[str, StringConstraints(pattern=r"^[^\x00]*$")]] | None,
    Form(
        description="how the file writes dates, as for strptime: %d/%m/%Y, %d.%m.%Y (repeat"
        " to try several in order; ISO 8601 is always read). One that names no day, month"
        " and year fails the run with that message"
    ),
]
DecimalComma = Annotated[
    bool, Form(description="numbers are written 1.234,5 (decimal comma, '.' between thousands)")
]
NO_NUL = r"^[^\x00]*$"
"""Names and values PostgreSQL can store (text holds no NUL)."""
Sheet = Annotated[str | None, Form(pattern=NO_NUL, description="XLSX: the sheet to read")]


@router.get("/api/v1/importers", tags=["importers"])
async def importers(client: ClientDep) -> dict[str, Any]:
    """The registered importers: table, key, policy, fields."""
    return {"data": [i.describe() for i in client.registry.all()]}


@router.post("/api/v1/imports/adhoc/upload", status_code=202, tags=["imports"], responses=WAITED)
async def upload_adhoc(
    file: Annotated[UploadFile, File(description="the file to import")],
    client: ClientDep,
    settings: SettingsDep,
    caller: Caller,
    table: Annotated[
        str,
        Form(
            min_length=1,
            pattern=r"^[^\x00]*[^\s\x00][^\x00]*$",
            description="target table, created when missing (its name normalised as columns'"
            " are: My Table -> my_table)",
        ),
    ],
    key: Annotated[
        str,
        Form(
            min_length=1,
            pattern=r"^[^\x00]*[^,\s\x00][^\x00]*$",
            description="key column(s), comma-separated",
        ),
    ],
    table_schema: Annotated[
        str, Form(alias="schema", pattern=NO_NUL, description="schema of the table")
    ] = "public",
    null_marker: Annotated[
        list[str] | None,
        Form(description="a cell value read as null (repeat for several; replaces the defaults)"),
    ] = None,
    sheet: Sheet = None,
    evolve: Annotated[
        bool, Form(description="add new columns and widen types of an existing table")
    ] = True,
    dry_run: DryRun = False,
    fresh: Fresh = False,
    date_format: DateFormat = None,
    decimal_comma: DecimalComma = False,
    wait: Wait = False,
) -> Response:
    """Upload a file and import it without an importer, as ``sluice import FILE --into TABLE
    --key COL`` does: columns and types come from the file."""
    options = _checked(
        adhoc_options,
        table=table,
        key=key,
        schema=table_schema,
        null_markers=null_marker or (),
        evolve=evolve,
        sheet=sheet,
        fresh=fresh,
        date_formats=date_format or (),
        decimal_comma=decimal_comma,
        check_formats=False,
    )
    run = await _stream_upload(
        ADHOC, file, client, settings, caller, dry_run=dry_run, options=options
    )
    return await _answer(client, run, wait=wait, wait_timeout=settings.api.wait_timeout)


@router.post("/api/v1/imports/{slug}/upload", status_code=202, tags=["imports"], responses=WAITED)
async def upload(
    slug: str,
    file: Annotated[UploadFile, File(description="the file to import")],
    client: ClientDep,
    settings: SettingsDep,
    caller: Caller,
    dry_run: DryRun = False,
    fresh: Fresh = False,
    date_format: DateFormat = None,
    decimal_comma: DecimalComma = False,
    sheet: Sheet = None,
    wait: Wait = False,
) -> Response:
    """Upload a file and start its import. The body is streamed to the file store.
    ``date_format`` and ``decimal_comma`` say how the file writes dates and numbers, for the
    importer's fields that do not say themselves."""
    options = _checked(
        run_options,
        fresh=fresh,
        date_formats=date_format or (),
        decimal_comma=decimal_comma,
        sheet=sheet,
        check_formats=False,
    )
    run = await _stream_upload(
        slug, file, client, settings, caller, dry_run=dry_run, options=options
    )
    return await _answer(client, run, wait=wait, wait_timeout=settings.api.wait_timeout)


def _checked(build: Callable[..., dict[str, Any] | None], **given: Any) -> dict[str, Any] | None:
    """A run's options from the form (``run_options``, ``adhoc_options``); 422 with what to
    fix when they cannot be used (a missing table or key). Date formats are checked by the
    run, which fails with what to fix: every request the OpenAPI document allows is taken."""
    try:
        return build(**given)
    except InvalidRequest as exc:
        raise ApiError(422, "invalid_parameters", str(exc)) from None


async def _stream_upload(
    slug: str,
    file: UploadFile,
    client: Client,
    settings: Settings,
    caller: str,
    *,
    dry_run: bool,
    options: dict[str, Any] | None,
) -> Run:
    """The uploaded file streamed to the file store, and its run queued."""
    if unsupported_type(file.content_type):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"the file is declared as {file.content_type!r}, which is not a format Sluice "
            "imports: upload delimited text (CSV, TSV, ...), JSON Lines or a JSON array "
            "(plain or gzip-compressed), an XLSX workbook or a Parquet file",
        )

    async def chunks() -> AsyncIterator[bytes]:
        while data := await file.read(1 << 20):
            yield data

    return await client.submit_stream(
        slug,
        chunks(),
        name=safe_filename(file.filename),
        dry_run=dry_run,
        options=options,
        content_type=file.content_type,
        max_bytes=settings.api.max_upload_bytes,
        source="upload",
        requested_by=caller,
    )


TRIGGER_EXAMPLES = {
    "url": {"value": {"url": "https://example.com/products.csv"}},
    "ftp": {"value": {"pattern": "orders-*.csv"}},
    "api": {"value": {"dry_run": True}},
}


@router.post("/api/v1/imports/{slug}/trigger", status_code=202, tags=["imports"], responses=WAITED)
async def trigger(
    slug: str,
    client: ClientDep,
    settings: SettingsDep,
    caller: Caller,
    body: Annotated[TriggerBody | None, Body(openapi_examples=TRIGGER_EXAMPLES)] = None,
    wait: Wait = False,
) -> Response:
    """Start an import that pulls its data: a URL (``url``), an FTP/SFTP file (``file`` or
    ``pattern``), a file under the configured roots (``path``), or the importer's paginated
    API. Every other field is passed to the source as a parameter."""
    params = (body or TriggerBody()).model_dump(exclude_none=True)
    dry_run = bool(params.pop("dry_run", False))
    fresh = bool(params.pop("fresh", False))
    full = bool(params.pop("full", False))
    run = await client.trigger(
        slug,
        params,
        dry_run=dry_run,
        requested_by=caller,
        options=run_options(fresh=fresh, full=full),
    )
    return await _answer(client, run, wait=wait, wait_timeout=settings.api.wait_timeout)


async def _answer(client: Client, run: Run, *, wait: bool, wait_timeout: float) -> Response:
    """The queued run (202), or with ``wait`` the run once finished (200; 202 when it is
    still going after ``wait_timeout`` seconds)."""
    status = 202
    if wait:
        run = await client.wait(run.id, timeout=wait_timeout)
        status = 200 if run.status.terminal else 202
    return Response(run.model_dump_json(), status_code=status, media_type="application/json")
