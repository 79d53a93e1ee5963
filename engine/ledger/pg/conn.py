"""A PostgreSQL connection that the ledger's SQL runs on as it runs on ``sqlite3``.

Each ``PgConnection`` is an asyncpg connection on an event loop of its own, in the one thread
of a ``Worker``: a repository's ``conn.execute(sql, params)`` runs the statement to the end
there (``loop.run_until_complete``) and returns a cursor, so a whole operation batch, the budget
book's decision included, stays the plain synchronous code it is on SQLite, with no await
between reading the counters and writing the hold. The event loop of the application never
waits on it: it hands the batch to the worker's thread in one hop, as with SQLite.

Each statement is translated once (and remembered): ``?`` placeholders become ``$1, $2, ...``,
``temp.`` becomes ``pg_temp.``, ``instr`` becomes ``strpos``, ``BEGIN IMMEDIATE`` becomes
``BEGIN``, and an INSERT into a table with a generated id returns the id (``lastrowid``).
Sums come back as integers (PostgreSQL sums bigints into numerics). A connection lost outside
a transaction is made again on the next statement; lost inside one, the transaction fails
(its operations are refused, never half-applied) and the next one connects again.

**Pipelining** (``pipelining``, set by the writer for a batch of several operations): a write
whose result its operation can foretell (a hold, a settlement's event, the closing of a hold
this process opened) is queued (``queue``) with what it must return, and the queue goes out
before the next statement that is not queued, or before the commit: the queued statements of
one text in one round trip (asyncpg's ``fetchmany``: every execution bound, then one sync),
texts in the order they were first queued. A batch of a dozen calls then costs six round trips,
not forty. Writes of different texts may so run in another order than they were queued: the
writes queued are ones no other queued write reads (new holds, new events, the closing of holds
opened in an earlier batch; the rollups they add to only add). What comes back other than
foretold, or an error, raises ``PipelineFailed``: the writer undoes the batch and runs it again
without pipelining, each operation then meeting its own outcome.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from engine.ledger.errors import LedgerRefusing, PipelineFailed, StoreError, in_one_line, unreachable

if TYPE_CHECKING:
    import asyncpg  # type: ignore[import-untyped]

#: Tables whose rows get a generated integer id: an INSERT into one returns it (``lastrowid``).
SERIAL_TABLES: Final = frozenset({
    "usage_events", "series", "hold_journal", "alerts", "budget_decisions", "webhook_deliveries", "audit_journal",
    "routing_decisions", "overshoots",
})
CONNECT_TIMEOUT_S: Final = 5.0
#: SQLSTATE of a statement the role has no privilege for (a grant missing).
INSUFFICIENT_PRIVILEGE: Final = "42501"
_INSERT_INTO: Final = re.compile(r"^\s*INSERT\s+INTO\s+([A-Za-z_][A-Za-z_0-9.]*)", re.IGNORECASE)
_TEMP: Final = re.compile(r"\btemp\.", re.IGNORECASE)
_INSTR: Final = re.compile(r"\binstr\(", re.IGNORECASE)
_STATUS_COUNT: Final = re.compile(r"(\d+)$")


@dataclass(frozen=True, slots=True)
class Statement:
    sql: str
    rows: bool  # the statement returns rows (SELECT, WITH, RETURNING)
    sums: bool  # it may return numerics that are integers (sum)
    begin: bool  # it starts a transaction
    ends: bool  # it ends one (COMMIT, ROLLBACK, but not ROLLBACK TO)
    commits: bool  # it ends one by committing it


_translated: dict[str, Statement] = {}


def translate(sql: str) -> Statement:
    """The statement as PostgreSQL takes it (remembered: the ledger's SQL is a few hundred texts)."""
    found = _translated.get(sql)
    if found is not None:
        return found
    out: list[str] = []
    number = 0
    quote: str | None = None
    for ch in sql:
        if quote is not None:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "?":
            number += 1
            out.append(f"${number}")
            continue
        out.append(ch)
    text = _INSTR.sub("strpos(", _TEMP.sub("pg_temp.", "".join(out)))
    head = text.lstrip().split(None, 1)[0].upper() if text.strip() else ""
    if text.strip().upper() == "BEGIN IMMEDIATE":
        text = "BEGIN"
    rows = head in ("SELECT", "WITH", "VALUES") or " RETURNING " in text.upper()
    insert = _INSERT_INTO.match(text)
    if not rows and insert is not None and insert.group(1).lower() in SERIAL_TABLES:
        text += " RETURNING id"
        rows = True
    words = text.strip().upper().split()
    found = Statement(text, rows, "SUM(" in text.upper().replace(" ", ""), head in ("BEGIN", "START"),
                      head in ("COMMIT", "END") or (head == "ROLLBACK" and "TO" not in words),
                      head in ("COMMIT", "END"))
    if len(_translated) < 10_000:
        _translated[sql] = found
    return found


@dataclass(slots=True)
class _Queued:
    """A write sent ahead (``PgConnection.queue``)."""

    statement: Statement
    parameters: list[Any]
    rows_each: int | None  # the rows it returns (None: not looked at)
    check: Callable[[list[tuple[Any, ...]]], None] | None  # given them; raises PipelineFailed if not as foretold


def _plain(value: Any) -> Any:
    if type(value) is Decimal and value == value.to_integral_value():
        return int(value)
    return value


class PgCursor:
    """What a statement returned, as a ``sqlite3.Cursor`` offers it."""

    __slots__ = ("_rows", "lastrowid", "rowcount")

    def __init__(self, rows: list[tuple[Any, ...]], rowcount: int, lastrowid: int | None) -> None:
        self._rows = rows
        self.rowcount = rowcount
        self.lastrowid = lastrowid

    def fetchone(self) -> Any:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[Any]:
        return self._rows

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)


class PgConnection:
    """An asyncpg connection driven synchronously from its worker's thread (see the module)."""

    dialect: Final = "postgresql"

    def __init__(self, dsn: str, setup: Callable[[PgConnection], None] | None = None) -> None:
        self.dsn = dsn
        self._setup = setup
        self._loop = asyncio.new_event_loop()
        self._pg: asyncpg.Connection | None = None
        self._in_tx = False
        self._deferred: tuple[str, list[Any]] | None = None  # a write sent with the next statement (defer)
        #: Queue writes whose results are foretold (see the module); the writer sets it for a batch.
        self.pipelining = False
        self._queue: list[_Queued] = []
        self.round_trips = 0  # statements (or pipelined groups of them) sent to the server (tests, benchmarks)
        self._chained = False  # the last commit began the next transaction (commit(chain=True)): nothing in it yet
        self._untouched = False  # in such a transaction, taken by begin(), no statement sent yet
        try:
            self._connect()
        except BaseException:  # no connection: the loop (and its self-pipe's sockets) go too
            self._loop.close()
            raise

    def _connect(self) -> None:
        import asyncpg

        self._pg = self.run(asyncpg.connect(
            self.dsn, timeout=CONNECT_TIMEOUT_S, server_settings={"application_name": "budgeteer"}))
        if self._setup is not None:
            self._setup(self)

    @property
    def raw(self) -> asyncpg.Connection:
        """The asyncpg connection (made again if it was lost)."""
        if self._pg is None or self._pg.is_closed():
            if self._in_tx:
                raise LedgerRefusing("the connection to the database was lost in the middle of a transaction")
            self._connect()
        assert self._pg is not None
        return self._pg

    def run(self, coro: Any) -> Any:
        """Run a coroutine of this connection's to the end (on its worker's thread). A server that
        cannot be reached for now (down, restarting, the connection lost) raises LedgerRefusing,
        which every caller takes as "try again later": a gateway answers 503, a settlement spills.
        A statement the role has no privilege for raises a StoreError that names the role."""
        self.round_trips += 1
        try:
            return self._loop.run_until_complete(coro)
        except Exception as exc:
            if (why := unreachable(exc)) is not None:
                raise LedgerRefusing(why) from None
            if getattr(exc, "sqlstate", None) == INSUFFICIENT_PRIVILEGE:
                raise self._denied(exc) from None
            raise

    @property
    def in_transaction(self) -> bool:
        return self._in_tx

    def _denied(self, exc: BaseException) -> StoreError:
        """A statement the role may not run: a sentence naming the role and what it lacks."""
        role = urlsplit(self.dsn).username or "this process connects as"
        return StoreError(f"the database role {role} lacks a privilege the ledger needs ({exc}); an administrator "
                          "grants it (the README's \"Who is acting\" lists the grants)")

    def defer(self, sql: str, parameters: Sequence[Any], /) -> None:
        """A write whose result nobody reads (an INSERT ... VALUES): sent as a part of the next
        statement of its operation that returns rows and is not one of the transaction's own
        (``WITH deferred AS (...) ...``: one round trip for both), queued with it when that one
        is queued; else alone, by any other statement or at the end of its operation
        (``end_operation``), so a failure is its operation's."""
        self._release_deferred()
        self._deferred = (sql, list(parameters))

    def _release_deferred(self) -> None:
        """The deferred write goes alone: queued when pipelining, else sent now."""
        if self._deferred is not None:
            sql, parameters = self._deferred
            self._deferred = None
            if self.pipelining:
                self._queue.append(_Queued(translate(sql), parameters, None, None))
            else:
                self.execute(sql, parameters)

    def _ride(self, sql: str, parameters: Sequence[Any]) -> tuple[str, Sequence[Any]]:
        """``sql`` with the deferred write as a part of it, if it can take one (WITH, SELECT)."""
        if self._deferred is not None:
            head = sql.lstrip()[:7].upper()
            if head.startswith("WITH ") or head.startswith("SELECT "):
                deferred, earlier = self._deferred
                self._deferred = None
                sql = (f"WITH deferred AS ({deferred}), {sql.lstrip()[5:]}" if head.startswith("WITH ")
                       else f"WITH deferred AS ({deferred}) {sql}")
                return sql, [*earlier, *parameters]
        return sql, parameters

    def end_operation(self) -> None:
        """An operation of the batch is done: its deferred write goes now (queued when pipelining)."""
        if self.pipelining:
            self._release_deferred()
        else:
            self.flush()

    def queue(self, sql: str, parameters: Sequence[Any], /, rows_each: int | None = None,
              check: Callable[[list[tuple[Any, ...]]], None] | None = None) -> None:
        """Send a write ahead (``pipelining`` only): it goes out with the other queued writes
        of its text before the next statement that is not queued. ``rows_each``: the rows it
        returns; ``check(rows)``: given them, raises ``PipelineFailed`` unless they are what
        its operation took them to be (and keeps what it needs of them)."""
        if not self.pipelining:
            raise RuntimeError("queue() outside a pipelined batch")
        sql, parameters = self._ride(sql, parameters)
        self._queue.append(_Queued(translate(sql), list(parameters), rows_each, check))

    def flush(self) -> None:
        """Send the deferred write and the queued ones now, if there are any."""
        self._release_deferred()
        if self._queue:
            self._send_queue()

    def _send_queue(self) -> None:
        """The queued writes, one round trip for each text, each group's results checked."""
        queue, self._queue = self._queue, []
        groups: dict[str, list[_Queued]] = {}
        for queued in queue:
            groups.setdefault(queued.statement.sql, []).append(queued)
        for sql, items in groups.items():
            try:
                records = self.run(self.raw.fetchmany(sql, [q.parameters for q in items]))
            except LedgerRefusing:
                raise
            except Exception as exc:  # which operation's it was, the batch run again tells
                raise PipelineFailed(f"a pipelined write failed: {in_one_line(exc)}") from exc
            counts = [q.rows_each for q in items if q.rows_each is not None]
            if len(counts) != len(items):  # some are not looked at
                continue
            rows = [tuple(r) for r in records]
            if len(rows) != sum(counts):
                raise PipelineFailed(f"pipelined writes returned {len(rows)} rows, not {sum(counts)}")
            at = 0
            for queued in items:
                count = queued.rows_each or 0
                if queued.check is not None:
                    queued.check(rows[at:at + count])
                at += count

    def begin(self) -> None:
        """Begin a transaction; one the last commit began already (``commit(chain=True)``) is
        taken as it is, unless its connection was closed meanwhile (a restart, a failover):
        then BEGIN on a new one, as at any BEGIN. A close not heard of yet is found by the
        first statement, which then begins on a new connection and is sent once more there."""
        if self._chained:
            self._chained = False
            self._loop.run_until_complete(asyncio.sleep(0))  # hear of a connection the server closed
            if self._pg is not None and not self._pg.is_closed():
                self._in_tx = self._untouched = True
                return
        self.execute("BEGIN")

    def commit(self, *, chain: bool = False) -> None:
        """COMMIT; ``chain``: and begin the next transaction in the same round trip (COMMIT AND
        CHAIN), for a writer whose next batch is waiting already. It holds no lock and no
        snapshot until its first statement."""
        if not chain:
            self.execute("COMMIT")
            return
        try:
            self.execute("COMMIT AND CHAIN")
        except BaseException:  # whatever state that left the session in, the next BEGIN starts afresh
            if self._pg is not None:
                self._pg.terminate()
            self._pg = None
            raise
        self._chained = True

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> PgCursor:
        if self._deferred is not None:
            sql, parameters = self._ride(sql, parameters)
            if self._deferred is not None:
                if sql.lstrip()[:8].upper() == "ROLLBACK":  # undone with what it undoes (no need to send it)
                    self._deferred = None
                else:
                    self._release_deferred()
        statement = translate(sql)
        if self._queue:
            if statement.ends and not statement.commits:
                self._queue.clear()  # undone with what it would have written
            else:
                self._send_queue()
        if statement.ends:
            self._untouched = False
            if self._pg is None or self._pg.is_closed():  # the transaction went with the connection
                committing = self._in_tx and statement.commits
                self._in_tx = False
                if committing:  # never a commit reported that was not made: its callers spill or retry
                    raise LedgerRefusing("the connection to the database was lost before the commit: "
                                         "the transaction was not made")
                return PgCursor([], -1, None)  # a rollback: nothing left to undo
            try:
                status = self.run(self._pg.execute(statement.sql))
            finally:
                self._in_tx = False
            if statement.commits and status != "COMMIT":
                # PostgreSQL answers a COMMIT of a failed transaction with ROLLBACK, and no error
                raise LedgerRefusing(f"the database rolled the transaction back at its commit ({status})")
            return PgCursor([], _count(status), None)
        if statement.begin:
            # The private loop runs only during statements: let it hear of a connection the server
            # closed while idle (a restart, a failover) first, and begin on a new one then.
            self._loop.run_until_complete(asyncio.sleep(0))
            try:
                self.run(self.raw.execute(statement.sql))
            except LedgerRefusing:  # lost before anything was done in it: once more, on a new connection
                if self._pg is not None:
                    self._pg.terminate()
                self._pg = None
                self.run(self.raw.execute(statement.sql))
            self._in_tx = True
            return PgCursor([], -1, None)
        if self._untouched:
            self._untouched = False
            try:
                return self._send(statement, parameters)
            except LedgerRefusing:  # nothing was done in it yet: once more, on a new connection
                if self._pg is not None:
                    self._pg.terminate()
                self._pg, self._in_tx = None, False
                self.execute("BEGIN")
        return self._send(statement, parameters)

    def _send(self, statement: Statement, parameters: Sequence[Any]) -> PgCursor:
        conn = self.raw
        if statement.rows:
            records = self.run(conn.fetch(statement.sql, *parameters))
            rows = [tuple(map(_plain, r)) for r in records] if statement.sums else [tuple(r) for r in records]
            last = int(rows[-1][0]) if rows and " RETURNING id" in statement.sql[-13:] else None
            return PgCursor(rows, len(rows), last)
        if parameters:
            status = self.run(conn.execute(statement.sql, *parameters))
        else:
            status = self.run(conn.execute(statement.sql))
        return PgCursor([], _count(status), None)

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> PgCursor:
        self.flush()
        statement = translate(sql)
        rows = [tuple(r) for r in parameters]
        if rows:
            text = statement.sql.removesuffix(" RETURNING id")
            self.run(self.raw.executemany(text, rows))
        return PgCursor([], -1, None)

    def close(self) -> None:
        try:
            if self._pg is not None and not self._pg.is_closed():
                try:
                    self.run(asyncio.wait_for(self._pg.close(), CONNECT_TIMEOUT_S))
                except Exception:  # a connection that cannot say goodbye is dropped all the same
                    self._pg.terminate()
        finally:
            self._pg = None
            self._loop.close()


def _count(status: str | None) -> int:
    """The row count of a command's status (``UPDATE 3``, ``INSERT 0 1``), or -1."""
    match = _STATUS_COUNT.search(status or "")
    return int(match.group(1)) if match else -1
