"""The committed JSON Schema files: up to date with the models, and true of real events."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from sluice.schemas.firehose import JetstreamEvent, parse_event
from sluice.schemas.generate import (
    JSON_DIR,
    MODELS,
    render_schemas,
    schema_file_name,
    write_schemas,
)
from sluice.service import Client
from tests.conftest import TOPICS, Stack, finish


def test_committed_schemas_match_the_models() -> None:
    for name, text in render_schemas().items():
        path = JSON_DIR / name
        assert path.exists(), f"{path} is missing: run `make schemas` and commit schemas/json"
        assert path.read_text(encoding="utf-8") == text, (
            f"{path} is out of date with the pydantic models: run `make schemas` and commit it"
        )
    stale = {p.name for p in JSON_DIR.glob("*.schema.json")} - set(render_schemas())
    assert not stale, f"schemas/json has files no model generates: {sorted(stale)}"


def test_schemas_are_valid_deterministic_and_end_with_a_newline(tmp_path: Path) -> None:
    first = write_schemas(tmp_path)
    assert {p.name for p in first} == {schema_file_name(m) for m in MODELS}
    assert write_schemas(tmp_path) == []  # nothing changed, nothing written
    for path in first:
        text = path.read_text(encoding="utf-8")
        assert text.endswith("}\n")
        schema = json.loads(text)
        Draft202012Validator.check_schema(schema)
        assert json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n" == text


def test_lifecycle_event_schema_names_the_contract_fields() -> None:
    schema = json.loads((JSON_DIR / "LifecycleEvent.schema.json").read_text())
    assert {"event_id", "type", "run_id", "importer", "time", "counters"} <= set(schema["required"])
    assert "error" in schema["properties"]
    validator = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    bad = {"event_id": "not-a-uuid", "type": "run.started", "run_id": str(uuid.uuid4())}
    assert not validator.is_valid(bad)


async def _raw_events(bootstrap: str, run_ids: set[str], until: int) -> list[dict[str, object]]:
    consumer = AIOKafkaConsumer(
        TOPICS.lifecycle, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    seen: list[dict[str, object]] = []
    finished: set[str] = set()
    try:
        async with asyncio.timeout(60):
            while len(finished) < until:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for record in records:
                        try:
                            event = orjson.loads(record.value)
                        except orjson.JSONDecodeError:
                            continue  # poison another test produced; the workers dead-letter it
                        if event["run_id"] in run_ids:
                            seen.append(event)
                            if event["type"] in ("run.completed", "run.failed"):
                                finished.add(event["run_id"])
    finally:
        await consumer.stop()
    return seen


@pytest.mark.stack
async def test_real_lifecycle_events_validate(stack: Stack, client: Client) -> None:
    from sluice import sdk

    settings = stack.settings()
    ok = await sdk.start(
        "t_sdk", b"id,name,price\n1,apple,1.5\n2,pear,oops\n", name="f.csv", settings=settings
    )
    bad = await sdk.start("t_sdk", b"id,name,price\n", name="empty.csv", settings=settings)
    assert (await finish(client, ok, stack)).status.value == "completed_with_errors"
    assert (await finish(client, bad, stack)).status.value == "failed"

    events = await _raw_events(stack.broker.bootstrap, {str(ok.id), str(bad.id)}, until=2)
    schema = json.loads((JSON_DIR / "LifecycleEvent.schema.json").read_text())
    validator = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    for event in events:
        errors = [e.message for e in validator.iter_errors(event)]
        assert not errors, f"{event} does not validate: {errors}"
    types = {e["type"] for e in events}
    assert {"run.started", "run.completed", "run.failed"} <= types
    failed = next(e for e in events if e["type"] == "run.failed")
    assert failed["error"] and "no data rows" in str(failed["error"])


def test_the_requests_topic_tells_start_messages_from_broken_import_requests() -> None:
    from pydantic import ValidationError

    from sluice.agents.split.agent import start_message
    from sluice.schemas.events import TriggerRequested

    start = start_message(b'{"importer": "products", "params": {"url": "https://x/p.csv"}}')
    assert isinstance(start, TriggerRequested) and start.importer == "products"
    wrong = start_message(b'{"importer": "products", "params": "not an object"}')
    assert isinstance(wrong, ValidationError) and "params" in str(wrong)
    # An import request with a stored file or a run id is not a start message, nor is non-JSON.
    assert start_message(b'{"importer": "p", "run_id": "x", "file": {}}') is None
    assert start_message(b'{"importer": "p", "file": {"id": 1}}') is None
    assert start_message(b"not json") is None and start_message(b"[1]") is None


def test_outcome_enums_keep_the_values_stored_and_served() -> None:
    # These strings are in PostgreSQL rows, metric labels and JSON: an enum member renamed
    # must not change them.
    from sluice.metrics import BATCH_OUTCOMES, FIREHOSE_OUTCOMES
    from sluice.schemas.events import BatchOutcome
    from sluice.schemas.firehose import EventOutcome, RecordOrigin, RepoStatus

    assert [str(o) for o in BatchOutcome] == ["applied", "duplicate", "inactive", "dead"]
    assert list(BATCH_OUTCOMES) == ["applied", "duplicate", "inactive", "dead"]
    assert list(FIREHOSE_OUTCOMES) == ["applied", "skipped", "deleted", "malformed"]
    assert [str(o) for o in EventOutcome] == ["applied", "skipped", "deleted", "malformed"]
    assert [str(o) for o in RecordOrigin] == ["live", "backfill"]
    assert [str(s) for s in RepoStatus] == ["active", "inactive", "deleted"]
    assert orjson.dumps({"origin": RecordOrigin.LIVE}) == b'{"origin":"live"}'


_EVENT = {
    "did": "did:plc:abc",
    "time_us": 1733000000000000,
    "kind": "commit",
    "commit": {
        "rev": "3l00000000001",
        "operation": "create",
        "collection": "app.bsky.feed.post",
        "rkey": "3k1",
        "record": {"text": "hé", "n": 1.5, "tags": ["a"], "nested": {"x": None}},
        "cid": "bafy",
    },
}


@pytest.mark.parametrize(
    "raw",
    [
        json.dumps(_EVENT).encode(),
        json.dumps({**_EVENT, "time_us": "1733000000000001"}).encode(),  # lax, as the JSON mode
        json.dumps({**_EVENT, "kind": "identity", "identity": {"handle": "a.b"}}).encode(),
        json.dumps({**_EVENT, "kind": "account", "account": {"active": False}}).encode(),
        json.dumps({**_EVENT, "commit": {**_EVENT["commit"], "operation": "delete"}}).encode(),
        json.dumps({**_EVENT, "extra": [1, 2]}).encode(),
        json.dumps({k: v for k, v in _EVENT.items() if k != "did"}).encode(),
        json.dumps({**_EVENT, "kind": "foo"}).encode(),
        json.dumps({**_EVENT, "time_us": "yesterday"}).encode(),
        json.dumps({**_EVENT, "commit": {**_EVENT["commit"], "record": None}}).encode(),
        json.dumps({**_EVENT, "commit": {**_EVENT["commit"], "record": {"t": "\ud800"}}}).encode(),
        b"[1, 2]",
        b"{not json",
        b"",
    ],
)
def test_parse_event_is_model_validate_json(raw: bytes) -> None:
    """The firehose's faster parse (orjson, then the model) accepts and refuses what pydantic's
    own JSON parsing does, with the same errors."""

    def outcome(parse: Any) -> Any:
        try:
            return parse(raw)
        except ValidationError as exc:
            return [(e["type"], e["loc"]) for e in exc.errors()]

    assert outcome(parse_event) == outcome(JetstreamEvent.model_validate_json)
