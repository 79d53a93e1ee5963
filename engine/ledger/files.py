"""A SQLite ledger is three files: the database, its write-ahead log (``-wal``, where the
latest writes may still be) and the log's shared-memory index (``-shm``). They go together:
removing a ledger removes all three, so that nothing of it is left beside the next database
made under its name."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

#: What SQLite adds to the database's name for each of its files (WAL mode).
SUFFIXES = ("", "-wal", "-shm")


def remove_ledger(path: Path | str) -> None:
    """Delete the ledger at ``path`` with its ``-wal`` and ``-shm`` (those missing are no error).
    Nothing may hold it open: a process writing to it would go on writing to deleted files."""
    for suffix in SUFFIXES:
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def is_dsn(location: object) -> bool:
    """Whether ``location`` names a PostgreSQL database (``postgresql://...``) rather than a file."""
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def redacted(location: object) -> str:
    """A ledger's location as messages, logs and the journal show it: a database's address
    without its password (in the address or as a ``password=`` parameter), a file's path."""
    text = str(location)
    if not is_dsn(text):
        return text
    text = re.sub(r"(://[^:/@?#]*):.*@", r"\1:***@", text)  # to the last @: a password may hold # / ? or @
    return re.sub(r"([?&]password=)[^&#]*", r"\1***", text, flags=re.IGNORECASE)


def local_name(dsn: str, home: Path) -> Path:
    """Where this machine keeps what belongs to the PostgreSQL ledger at ``dsn`` (its spill
    journal, its vault): a name made of the user, host, port and database, never the password."""
    parts = urlsplit(dsn)
    database = unquote(parts.path.lstrip("/")) or (parts.username or "postgres")
    name = f"{parts.username or ''}@{parts.hostname or 'localhost'}-{parts.port or 5432}-{database}"
    return home / "postgresql" / re.sub(r"[^A-Za-z0-9@._-]", "_", name)
