"""The spill journal: settlements of answered calls that the ledger refused to write.

When the ledger refuses a call's settlement after the provider has answered (the disk full, an
I/O error, its write lock held past the busy timeout), the settlement is appended as one JSON
line to ``<ledger>.spill`` beside the ledger and fsynced before the caller gets its answer. A
governed process allocates the file's room ahead of need (RESERVE_BYTES, its size staying 0),
so a full disk still takes the journal's lines; if even that fails a settlement is kept in
memory, and the log says so once. ``Engine`` replays the journal
into the ledger as soon as a write succeeds again and whenever it opens. A replay writes each
settlement by its request id (the ledger's unique key of an event) and closes its hold only if
it is still open, so a replay repeated (after a crash, or by two processes) writes nothing twice.

Appends, and emptying the file after a replay, take an exclusive ``flock`` on the file, so processes
sharing a ledger never lose each other's lines.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.models import EVENT_FIELDS, UsageEvent

log = logging.getLogger("budgeteer")
SUFFIX = ".spill"
#: Room allocated to the journal's file ahead of need (its size stays 0): a full disk refuses the
#: ledger's writes, and would refuse the journal's too. Some 500 settlements of ~450 bytes each.
RESERVE_BYTES = 256 * 1024
_KEEP_SIZE = 1  # FALLOC_FL_KEEP_SIZE: allocate past the end without changing the file's size


def _preallocate(fd: int, offset: int, length: int) -> None:
    """Allocate disk blocks for [offset, offset + length) of ``fd`` without changing its size
    (Linux's fallocate; nothing where the C library has none). OSError if the disk refuses."""
    fallocate = getattr(ctypes.CDLL(None, use_errno=True), "fallocate", None)
    if fallocate is None:
        return
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if fallocate(fd, _KEEP_SIZE, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


@dataclass(frozen=True, slots=True)
class Spilled:
    """One settlement the ledger refused: the call's event (priced) and the hold it settles
    (None: the call had none); ``event`` None releases the hold (a call never made)."""

    hold_id: str | None
    event: UsageEvent | None

    @property
    def key(self) -> str:
        return self.event.request_id if self.event is not None else f"release:{self.hold_id}"

    def line(self) -> bytes:
        record: dict[str, Any] = {"hold_id": self.hold_id,
                                  "event": self.event.as_dict() if self.event is not None else None}
        return json.dumps(record, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def parse(cls, line: bytes) -> Spilled:
        record = json.loads(line)
        raw = record.get("event")
        event = UsageEvent(**{k: v for k, v in raw.items() if k in EVENT_FIELDS}) if raw is not None else None
        return cls(record.get("hold_id"), event)


@dataclass(frozen=True, slots=True)
class Taken:
    """What ``take`` handed out: the records (the file's, then memory's) and the file's bytes."""

    records: list[Spilled]
    file_data: bytes
    from_file: int


class SpillJournal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.memory: list[Spilled] = []  # spilled where the file could not be written
        self._said_memory = False

    @contextlib.contextmanager
    def _locked(self, create: bool) -> Iterator[int | None]:
        """The journal's file, open and exclusively locked (None when it does not exist and
        ``create`` is false). The file may have been replaced or removed while waiting for
        the lock: it is opened again until the lock is on the file at the path."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
            except FileNotFoundError:
                if create:
                    raise
                yield None
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    yield fd
                    return
            finally:
                os.close(fd)

    def reserve(self) -> None:
        """Allocate RESERVE_BYTES to the journal's file past what it holds (creating it, empty),
        so that appends still find room on a full disk. Best effort: without it, a full disk
        sends settlements to memory."""
        try:
            with self._locked(create=True) as fd:
                assert fd is not None
                _preallocate(fd, os.fstat(fd).st_size, RESERVE_BYTES)
        except OSError:
            pass

    def pending(self) -> bool:
        try:
            return bool(self.memory) or self.path.stat().st_size > 0
        except FileNotFoundError:
            return False

    def append(self, record: Spilled) -> None:
        """Append and fsync ``record``; in memory if the file cannot take it (said once)."""
        line = record.line()
        try:
            with self._locked(create=True) as fd:
                assert fd is not None
                end = os.lseek(fd, 0, os.SEEK_END)
                if end and os.pread(fd, 1, end - 1) != b"\n":  # a line torn by a crash: end it first
                    line = b"\n" + line
                try:
                    written = 0
                    while written < len(line):
                        written += os.write(fd, line[written:])
                    os.fsync(fd)
                except OSError:
                    os.ftruncate(fd, end)  # no half line left for the next append to follow
                    raise
        except OSError as exc:
            self.memory.append(record)
            if not self._said_memory:
                self._said_memory = True
                log.warning("spill journal %s cannot be written (%s): keeping settlements in memory until the "
                            "ledger takes them", self.path, exc.strerror or exc)

    def take(self) -> Taken:
        """Every record spilled so far (the file's, then memory's), for a replay."""
        records: list[Spilled] = []
        data = b""
        with self._locked(create=False) as fd:
            if fd is not None:
                data = os.pread(fd, os.fstat(fd).st_size, 0)
                for number, line in enumerate(data.split(b"\n"), 1):
                    if not line.strip():
                        continue
                    try:
                        records.append(Spilled.parse(line))
                    except (ValueError, TypeError, AttributeError) as exc:
                        log.warning("spill journal %s: line %d is not a settlement, skipped (%s)",
                                    self.path, number, exc)
        return Taken(records + self.memory, data, len(records))

    def done(self, taken: Taken, keep: list[Spilled]) -> None:
        """The records of ``taken`` are in the ledger, but those in ``keep``: they stay where
        they were, with whatever was spilled since ``take``. A file that no longer begins with
        what was taken was emptied by another process's replay meanwhile, and is left alone; so
        is one that cannot be rewritten: a later replay finds its records in the ledger and
        writes nothing."""
        from_memory = taken.records[taken.from_file:]
        self.memory[:len(from_memory)] = [r for r in from_memory if r in keep]
        if not self.memory:
            self._said_memory = False  # said again the next time
        kept = [r for r in taken.records[:taken.from_file] if r in keep]
        if len(kept) == taken.from_file:  # nothing of the file's was written: it stays as it is
            return
        try:
            with self._locked(create=False) as fd:
                data = os.pread(fd, os.fstat(fd).st_size, 0) if fd is not None else b""
                if fd is None or not data.startswith(taken.file_data):
                    return
                rest = b"".join(r.line() for r in kept) + data[len(taken.file_data):]
                if not rest:  # emptied, and its room allocated again
                    os.ftruncate(fd, 0)
                    os.fsync(fd)
                    with contextlib.suppress(OSError):
                        _preallocate(fd, 0, RESERVE_BYTES)
                    return
                fresh = self.path.with_name(self.path.name + ".new")
                with open(fresh, "wb") as out:
                    out.write(rest)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(fresh, self.path)
        except OSError as exc:
            log.warning("spill journal %s could not be emptied after its replay (%s); the next replay writes "
                        "nothing twice", self.path, exc.strerror or exc)
