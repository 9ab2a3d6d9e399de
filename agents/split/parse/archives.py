"""Archives that are not data files: a ZIP archive that is no Office document, a tar archive
(plain or gzip-compressed). Each is refused with what to do instead: unpack it and import what
it holds."""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from typing import BinaryIO

# A tar archive is 512-byte blocks; a member's header has "ustar" at offset 257 (POSIX and GNU).
TAR_BLOCK = 512
_TAR_MAGIC_AT = 257
_TAR_MAGIC = b"ustar"
# A ZIP that is an Office document has one of these; a plain archive (of CSV files, say) has
# neither, nor the workbook's folder.
_OFFICE_PARTS = ("[Content_Types].xml", "mimetype")
_WORKBOOK_FOLDER = "xl/"
_NAMES_SHOWN = 5


def archive_refusal(entries: Sequence[zipfile.ZipInfo]) -> str | None:
    """What to do with a ZIP archive that is no Office document at all (None for one that
    is: a workbook, or another kind, which the XLSX reader says it cannot read)."""
    names = [entry.filename for entry in entries]
    if any(n in _OFFICE_PARTS or n.startswith(_WORKBOOK_FOLDER) for n in names):
        return None
    # macOS adds __MACOSX/ resource forks to the archives it makes: not files anyone chose.
    files = [
        e.filename for e in entries if not e.is_dir() and not e.filename.startswith("__MACOSX/")
    ]
    if not files:
        return "this is an empty ZIP archive, not an XLSX workbook: it holds no file to import"
    shown = ", ".join(files[:_NAMES_SHOWN])
    if len(files) > _NAMES_SHOWN:
        shown += f" and {len(files) - _NAMES_SHOWN} more"
    what = "the file" if len(files) == 1 else "each file on its own"
    return f"this is a ZIP archive of {shown}: unzip it and import {what}"


def zip_archive_refusal(raw: BinaryIO) -> str | None:
    """For a seekable file that starts as a ZIP: what to do when it is a plain archive, not a
    workbook; None otherwise (or when it cannot be read as a ZIP at all). `raw` is left where
    it was."""
    start = raw.tell()
    try:
        with zipfile.ZipFile(raw) as archive:
            return archive_refusal(archive.infolist())
    except Exception:  # damaged: the reader says so
        return None
    finally:
        raw.seek(start)


def tar_refusal(head: bytes, compression: str) -> str | None:
    """Why the file is not text, when its first block is a tar member's header."""
    block = head[:TAR_BLOCK]
    if block[_TAR_MAGIC_AT : _TAR_MAGIC_AT + len(_TAR_MAGIC)] != _TAR_MAGIC or b"\x00" not in block:
        return None
    name = block[:100].split(b"\x00", 1)[0].decode("utf-8", "replace")
    prefix = block[345:500].split(b"\x00", 1)[0].decode("utf-8", "replace")  # POSIX ustar
    if prefix:
        name = f"{prefix}/{name}"
    if compression == "gzip":
        what, how = "a gzip-compressed tar archive (.tar.gz)", "tar -xzf FILE"
    else:
        what, how = "a tar archive (.tar)", "tar -xf FILE"
    member = f" whose first member is {name!r}" if name else ""
    return (
        f"the file is {what}{member}, not a data file: extract it ({how}, or any archive tool) "
        f"and import the file it holds"
    )
