"""SLUICE_FILE_STORE and the SLUICE_S3_* settings: what selects a store, what is refused."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sluice.config import FileStoreSettings, Settings


def test_an_empty_store_means_postgresql(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLUICE_FILE_STORE", raising=False)
    assert not Settings().files.uses_s3
    assert not FileStoreSettings(store="  ").uses_s3


def test_the_store_url_gives_the_bucket_and_the_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_FILE_STORE", "s3://sluice-files/prod/uploads/")
    monkeypatch.setenv("SLUICE_S3_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("SLUICE_S3_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("SLUICE_S3_SECRET_ACCESS_KEY", "not-printed")
    files = Settings().files
    assert files.uses_s3
    assert (files.bucket, files.prefix) == ("sluice-files", "prod/uploads/")
    assert files.endpoint_url == "http://minio:9000"
    assert "not-printed" not in repr(files)
    assert FileStoreSettings(store="s3://sluice-files").prefix == ""


@pytest.mark.parametrize(
    "store", ["sluice-files", "gs://sluice-files/x", "s3://", "s3://No_Such/x", "s3://ab"]
)
def test_a_store_that_is_not_an_s3_location_is_refused(store: str) -> None:
    with pytest.raises(ValidationError, match=r"write s3://BUCKET or s3://BUCKET/PREFIX"):
        FileStoreSettings(store=store)


def test_keys_come_in_pairs_or_not_at_all() -> None:
    with pytest.raises(ValidationError, match="SLUICE_S3_SECRET_ACCESS_KEY together"):
        FileStoreSettings(store="s3://sluice-files", access_key_id="AKIAEXAMPLE")
    # Neither: the standard AWS credential chain.
    assert FileStoreSettings(store="s3://sluice-files").access_key_id == ""


def test_parts_are_at_least_what_s3_accepts() -> None:
    with pytest.raises(ValidationError, match="greater than or equal to 5242880"):
        FileStoreSettings(part_bytes=1 << 20)
