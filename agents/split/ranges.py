"""Byte ranges: a large delimited file parsed, mapped and routed on every core.

One process splits a file, but the Python work per row (the csv module, the mapping, the key's
partition) would keep one core busy while the others wait. So a delimited file of text cells
(the COPY path) larger than two ranges is cut into byte ranges of about
``pipeline.split_range_bytes``, each ending at a line end outside quotes, and a pool of
``pipeline.split_processes`` processes reads them in parallel. The split takes their results
in file order, so every partition receives its rows in file order and the last row of a key
still wins; it only cuts the batches and sends them.

Where a range ends is proposed by counting quotes (a line end after an even number of them is
outside quotes), and the csv module judges: a range that ends inside a quoted field (a quote
in the middle of an unquoted field, ``5 inch" screen``, misleads the count) is read again
together with the next one. A range's records are numbered from the count of the records
before it, proposed by a process of the pool (its lines; once that was wrong, its line ends
outside quotes) and checked against what the csv module read: a wrong guess is read again
with the right number. So the rows, their numbers and every reason are those of
reading the file from start to end, and the cut depends only on the file and the range size,
which the run's plan keeps: a split done again (after a crash) cuts the same batches.
"""

from __future__ import annotations

import array
import asyncio
import atexit
import collections
import concurrent.futures
import csv
import hashlib
import io
import itertools
import logging
import multiprocessing
import operator
import os
import pickle
import re
import signal
import threading
import time
import zlib
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

from sluice.agents.split import columnar
from sluice.agents.split.lines import CopyLines
from sluice.agents.split.map import RecordMapper
from sluice.agents.split.parse.delimited import UnclosedQuote, delimited_rows
from sluice.agents.split.parse.encoding import UTF8_BOM, decode_error
from sluice.agents.split.repeats import BUCKETS
from sluice.schemas.events import copy_lines
from sluice.schemas.formats import Sniffed
from sluice.schemas.importers import Importer
from sluice.schemas.runs import RowFailure

log = logging.getLogger(__name__)

ENCODINGS = frozenset({"utf-8", "utf-8-sig", "ascii", "iso8859-1", "iso8859-15", "cp1252"})
"""Encodings (by their codecs names) in which a byte 0x0A is a line end and nothing else, so a
range may end after one."""

_BLANK = re.compile(rb"\n(?=\r?\n)")
"""A line end followed by an empty line (which the csv module reads as no record)."""

_LOW = BUCKETS - 1
_SIGN = 1 << 63  # an unsigned 64-bit hash less this fits an array of "q"


def _joined(crc: int, adler: int) -> int:
    return (crc << 32 | adler) - _SIGN


@dataclass(frozen=True)
class RangeSpec:
    """What a process needs to read the ranges of one file (pickled once per file)."""

    path: str
    encoding: str
    delimiter: str
    header: list[str]
    importer: Importer
    partitions: int
    key_at: tuple[int, ...]
    """the positions of the key's cells in a mapped row"""
    max_record_bytes: int


@dataclass(frozen=True)
class RangeJob:
    start: int
    end: int
    number: int
    """records before the range"""
    lines: int
    """lines before the range (a reason names the line of the file)"""
    last: bool


@dataclass
class RangeResult:
    records: int
    """records read (rows and rejected ones)"""
    lines: list[CopyLines]
    """per partition, the COPY lines of its rows in file order"""
    failures: list[RowFailure]
    hashes: list[bytes]
    """per bucket of the repeat counter, the keys' 64-bit hashes (array of "q")"""
    end: int
    """the range's end (a byte offset of the file)"""
    unclosed: bool = False
    """the range ends inside a quoted field: its end is not a record's"""


# -- the process side ---------------------------------------------------------------------------

_mappers: dict[bytes, tuple[RangeSpec, RecordMapper]] = {}


def _child_init(worker: int) -> None:
    # Ctrl-C in a terminal reaches the whole process group: the worker shuts the pool down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_end_with, args=(worker,), name="worker-watch", daemon=True).start()


def _end_with(worker: int) -> None:
    """End this reader when its worker is gone. A worker killed (SIGKILL, the OOM killer) does
    not shut its pool down, and a reader waits for its next job forever: it holds both ends of
    the job queue's pipe, so it never reads the end of it (and the fork server stays while it
    lives)."""
    while _alive(worker):
        time.sleep(1.0)
    os._exit(0)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"  # a zombie has ended
    except FileNotFoundError:
        return False
    except OSError:  # no /proc here
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _prepared(spec: bytes | RangeSpec) -> tuple[RangeSpec, RecordMapper]:
    if isinstance(spec, RangeSpec):
        return spec, RecordMapper(spec.importer, spec.header)
    digest = hashlib.blake2b(spec, digest_size=16).digest()
    if digest not in _mappers:
        _mappers.clear()  # one file at a time
        loaded: RangeSpec = pickle.loads(spec)
        _mappers[digest] = (loaded, RecordMapper(loaded.importer, loaded.header))
    return _mappers[digest]


def read_range(spec: bytes | RangeSpec, job: RangeJob) -> RangeResult:
    """Parse, map and route the records of one byte range (in a process of the pool)."""
    rspec, mapper = _prepared(spec)
    with open(rspec.path, "rb") as file:
        file.seek(job.start)
        data = file.read(job.end - job.start)
    by_columns = columnar.read_columns(
        data,
        rspec.encoding,
        rspec.delimiter,
        len(rspec.header),
        mapper,
        job.number,
        job.lines,
        rspec.max_record_bytes,
        rspec.key_at,
    )
    if by_columns is not None:
        read, lines, keys, rejected = by_columns
        parts, hashes = columnar.routed(lines, keys, rspec.partitions)
        return RangeResult(read, parts, rejected, hashes, job.end)
    buckets = [array.array("q") for _ in range(BUCKETS)]
    place = _Placer(buckets, rspec.partitions)
    try:
        text = data.decode(rspec.encoding)
    except UnicodeDecodeError as exc:
        raise decode_error(exc, job.end, rspec.encoding) from None
    csv.field_size_limit(rspec.max_record_bytes)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=rspec.delimiter, strict=True)
    rows = delimited_rows(
        reader, len(rspec.header), None, rspec.encoding, number=job.number, lines=job.lines
    )
    failures: list[RowFailure] = []
    records = 0
    at = rspec.key_at
    key_of: Callable[[list[str]], str]
    if len(at) == 1:
        key_of = operator.itemgetter(at[0])
    else:  # the key text the router gives (route.BatchRouter)
        pick = operator.itemgetter(*at)
        key_of = lambda row: "\x1f".join(pick(row))  # noqa: E731
    try:
        while True:
            chunk = list(itertools.islice(rows, 1000))
            if not chunk:
                break
            records += len(chunk)
            mapped, rejected = mapper.map_text(chunk)
            failures.extend(rejected)
            place(copy_lines(mapped), [k.encode() for k in map(key_of, mapped)])
    except UnclosedQuote:
        if job.last:
            raise
        return RangeResult(0, [], [], [], job.end, unclosed=True)
    parts = [CopyLines.of(part) for part in place.parts]
    return RangeResult(records, parts, failures, [b.tobytes() for b in buckets], job.end)


class _Placer:
    """Puts the COPY lines of a range's rows (read by the csv module) into their partitions,
    and their keys' hashes into the repeat counter's buckets (``columnar.routed`` does the
    same by columns)."""

    def __init__(self, buckets: list[array.array[int]], n: int) -> None:
        self.parts: list[list[str]] = [[] for _ in range(n)]
        self._to_part = [part.append for part in self.parts]
        self._to_bucket = [bucket.append for bucket in buckets]
        self._partitions = n

    def __call__(self, lines: list[str], keys: list[bytes]) -> None:
        # The partition of each key (as streams.topics.partition_for_key gives) and a 64-bit
        # hash of it for the repeats, the same in every process (``hash`` is salted per
        # process): CRC-32 and Adler-32 of the key's bytes.
        crcs = list(map(zlib.crc32, keys))
        to_bucket, to_part, partitions = self._to_bucket, self._to_part, self._partitions
        for h in map(_joined, crcs, map(zlib.adler32, keys)):
            to_bucket[h & _LOW](h)
        for line, crc in zip(lines, crcs, strict=True):
            to_part[crc % partitions](line)


# -- the splitting side -------------------------------------------------------------------------


class FileBytes:
    """A file's bytes as the cutter reads them: slices and ``find`` by ``os.pread``. (A mapped
    file would do, but the pages it touches count in the worker's resident memory: the whole
    file by the end.)"""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = os.fstat(fd).st_size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, part: slice) -> bytes:
        start, stop, _ = part.indices(self.size)
        return os.pread(self.fd, max(0, stop - start), start)

    def find(self, sub: bytes, start: int, end: int | None = None) -> int:
        """The first ``sub`` (one byte) at or after ``start`` and before ``end``; -1 if none."""
        stop = self.size if end is None else min(end, self.size)
        while start < stop:
            block = os.pread(self.fd, min(1 << 16, stop - start), start)
            at = block.find(sub)
            if at >= 0:
                return start + at
            start += len(block)
        return -1


class RangeCutter:
    """Proposes where the ranges of a file whose bytes are ``data`` (FileBytes) end, from
    ``start`` (the first data record's first byte), each about ``range_bytes`` long. Only the
    ends: what a range holds is counted by ``count_range``, in the pool."""

    def __init__(self, data: Any, start: int, range_bytes: int) -> None:
        self.data = data
        self.size = len(data)
        self.start = start
        self.range_bytes = range_bytes
        self.cuts: list[int] = []
        """the ends proposed so far"""
        self._at = start

    def cut(self, i: int) -> int | None:
        """The ``i``-th range's end, proposed on first use; None past the end."""
        while len(self.cuts) <= i:
            if self._at >= self.size:
                return None
            self.cuts.append(self._propose())
        return self.cuts[i]

    def begin(self, i: int) -> int:
        return self.start if i == 0 else self.cuts[i - 1]

    def _propose(self) -> int:
        data, begin, size = self.data, self._at, self.size
        end = min(begin + self.range_bytes, size)
        quotes = data[begin:end].count(b'"')
        # On to a line end after an even number of quotes: inside a quoted field, to its
        # next quote first. Without one within a range's length (a stray quote in an unquoted
        # field keeps the count odd to the end of the file), the next line end whatever the
        # count: the csv module judges either way.
        reach = end + self.range_bytes
        while end < size:
            if quotes % 2:
                q = data.find(b'"', end, reach)
                if q >= 0:
                    quotes += 1
                    end = q + 1
                    continue
                quotes = 0  # give up counting
            nl = data.find(b"\n", end)
            if nl < 0:
                end = size
                break
            quotes += data[end:nl].count(b'"')
            end = nl + 1
            if quotes % 2 == 0:
                break
        self._at = end
        return end


def count_range(path: str, begin: int, end: int, exact: bool) -> tuple[int, int]:
    """The records a range is guessed to hold and its lines, in a process of the pool (not in
    the worker's event loop: 30 to 40 ms for each 8 MiB range, 2 s of a 1,000,000-row split
    with the loop blocked). ``exact``: by ``guess_records``; else the count of its lines,
    which is right unless a quoted field holds a line end or a line is empty, six times
    cheaper; a wrong guess is found by the read, and the split counts exactly from then on."""
    with open(path, "rb") as file:
        piece = os.pread(file.fileno(), end - begin, begin)
    lines = count_lines(piece)
    if exact:
        return guess_records(piece), lines
    ends = piece.count(b"\n") if b"\r" in piece else lines  # line feeds, as guess_records
    tail = piece[piece.rfind(b"\n") + 1 :]
    return ends + (1 if tail.strip(b"\r") else 0), lines


def guess_records(piece: bytes) -> int:
    """The records the csv module reads in ``piece`` if every quote in it opens or closes a
    quoted field (or is one of a doubled pair): its line ends outside quotes, less those that
    end an empty line, and a last line without a line end."""
    outside = b"\x00".join(piece.split(b'"')[0::2]) if b'"' in piece else piece
    ends = outside.count(b"\n")
    # The regex, not ``b"\n\n" in``: a search for a pattern that starts with a line end in text
    # full of them is four times slower than this whole count (10 ms for 8 MiB).
    blank = len(_BLANK.findall(outside)) + outside.startswith((b"\n", b"\r\n"))
    tail = outside.rsplit(b"\n", 1)[-1]
    return ends - blank + (1 if tail.strip(b"\r") else 0)


def count_lines(piece: bytes) -> int:
    """Lines as the csv module counts them (``\\n``, ``\\r\\n`` and a lone ``\\r`` end one)."""
    lines = piece.count(b"\n")
    if b"\r" in piece:
        lines += piece.count(b"\r") - piece.count(b"\r\n")
    return lines


def data_start(data: Any, sniffed: Sniffed, header: list[str]) -> tuple[int, int] | None:
    """Where the first data record starts and the lines before it, when the header is the
    first record at the file's first byte (after a UTF-8 byte-order mark); else None."""
    begin = len(UTF8_BOM) if data[:3] == UTF8_BOM else 0
    first = RangeCutter(data, begin, 1).cut(0)
    if first is None:
        return None
    head = data[begin:first]
    try:
        text = head.decode(sniffed.encoding or "utf-8")
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=sniffed.delimiter or ",")
        records = list(reader)
    except (UnicodeDecodeError, LookupError, csv.Error):
        return None
    if len(records) != 1 or [n.strip() for n in records[0]] != [h.strip() for h in header]:
        return None
    return first, count_lines(head)


def usable(sniffed: Sniffed) -> bool:
    """Whether byte ranges can read the file: plain delimited text in an encoding that ends
    lines with a byte 0x0A alone."""
    return (
        sniffed.format == "csv"
        and sniffed.compression == "none"
        and (sniffed.encoding or "").lower() in ENCODINGS
    )


# -- the pool -----------------------------------------------------------------------------------

_pool: concurrent.futures.ProcessPoolExecutor | None = None
_pool_size = 0


def pool(processes: int) -> concurrent.futures.ProcessPoolExecutor:
    """The worker's pool of ``processes`` range readers, started on first use (a fork server
    that imported this module forks them: nothing of the worker's threads and loop is in
    them)."""
    global _pool, _pool_size
    if _pool is None or _pool_size != processes:
        if _pool is not None:
            _pool.shutdown(wait=False, cancel_futures=True)
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        _pool = concurrent.futures.ProcessPoolExecutor(
            processes, mp_context=context, initializer=_child_init, initargs=(os.getpid(),)
        )
        _pool_size = processes
        atexit.register(forget_pool)  # before the interpreter's teardown, which it would race
    return _pool


def forget_pool() -> None:
    """Shut the pool down (at exit, or after it broke: a process killed); the next split
    starts a new one."""
    global _pool
    if _pool is not None:
        atexit.unregister(forget_pool)
        _pool.shutdown(wait=True, cancel_futures=True)
    _pool = None


def processes(setting: int) -> int:
    return setting or os.cpu_count() or 1


async def read_ranges(
    cutter: RangeCutter, spec: RangeSpec, workers: int, lines: int
) -> AsyncGenerator[RangeResult, None]:
    """The results of every range of the file, in file order, read ``workers`` at a time by
    the pool (in a thread of this process when ``workers`` is 1: the same ranges, the same
    results); ``lines``: the lines before the first range (the header's)."""
    loop = asyncio.get_running_loop()
    executor: concurrent.futures.Executor | None = None
    payload: bytes | RangeSpec = spec
    if workers > 1:
        try:
            payload = pickle.dumps(spec)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            # An importer holding something that does not pickle (a lambda, say): the ranges
            # are read here, the same ranges with the same results.
            log.info("the ranges are read in this process: the importer does not pickle: %s", exc)
            workers = 1
        else:
            executor = pool(workers)
    window = workers + 1
    # Each job read ahead, with the state before it and the cuts it spans.
    queue: collections.deque[tuple[RangeJob, asyncio.Future[RangeResult], _State, int, int]]
    queue = collections.deque()
    # What each cut holds, counted in the pool ahead of the jobs that need it (it depends only
    # on the cut's bytes: a job read again with other numbers counts nothing again).
    counts: dict[int, asyncio.Future[tuple[int, int]]] = {}
    exact = False

    def counted(i: int) -> asyncio.Future[tuple[int, int]]:
        found = counts.get(i)
        if found is None:
            end = cutter.cut(i)
            assert end is not None
            found = loop.run_in_executor(
                executor, count_range, spec.path, cutter.begin(i), end, exact
            )
            counts[i] = found
        return found

    def count_ahead(index: int) -> None:
        for i in range(index, index + window + 1):
            if cutter.cut(i) is None:
                return
            counted(i)

    async def after(before: _State, first: int, last: int) -> _State:
        """The state after a job of cuts ``first`` to ``last`` if the guess of its records is
        right: the next range's index, the records and the lines before it."""
        found = [await counted(i) for i in range(first, last + 1)]
        return _State(
            last + 1,
            before.number + sum(records for records, _ in found),
            before.lines + sum(lines for _, lines in found),
        )

    async def fill(state: _State, span: int) -> None:
        while len(queue) < window:
            if queue:
                job, _, before, first, last = queue[-1]
                if job.last:
                    return
                state, span = await after(before, first, last), 0
            made = _job(cutter, state, span)
            if made is None:
                return
            job, last = made
            future = loop.run_in_executor(executor, read_range, payload, job)
            queue.append((job, future, state, state.index, last))

    def drop() -> None:
        while queue:
            queue.popleft()[1].cancel()

    state = _State(0, 0, lines)
    span = 0  # cuts the next range spans beyond its own (after a range ended in a quote)
    try:
        count_ahead(0)
        await fill(state, span)
        while queue:
            job, future, before, first, last = queue.popleft()
            result = await future
            if result.unclosed:  # it ends inside a quoted field: read it with the next one
                span += 1
                drop()
                await fill(before, span)
                continue
            span = 0
            state = await after(before, first, last)
            if job.number + result.records != state.number:
                # Its records were not the guess: the ranges after it need other numbers, and
                # the counts ahead are guessed exactly from now on.
                state = _State(state.index, job.number + result.records, state.lines)
                drop()
                if not exact:
                    exact = True
                    for i in [i for i in counts if i >= state.index]:
                        counts.pop(i).cancel()
            count_ahead(state.index)
            await fill(state, 0)
            yield result
    except concurrent.futures.BrokenExecutor:
        forget_pool()
        raise
    finally:
        drop()
        for pending in counts.values():
            pending.cancel()


@dataclass(frozen=True)
class _State:
    index: int
    number: int
    lines: int


def _job(cutter: RangeCutter, state: _State, span: int) -> tuple[RangeJob, int] | None:
    """The job of range ``state.index`` spanning ``span`` more cuts, and its last cut; None
    past the end."""
    if cutter.cut(state.index) is None:
        return None
    last = state.index + span
    while cutter.cut(last) is None:
        last -= 1
    job = RangeJob(
        cutter.begin(state.index),
        cutter.cuts[last],
        state.number,
        state.lines,
        cutter.cut(last + 1) is None,
    )
    return job, last
