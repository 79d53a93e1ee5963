"""The PostgreSQL connection the ledger's SQL runs on: a transaction whose connection is lost
is never reported as committed."""

from __future__ import annotations

import pytest

from engine.ledger import LedgerRefusing
from engine.ledger.pg.conn import PgConnection
from tests import pg


def _terminate(admin_dsn: str, pid: int) -> None:
    pg.execute(admin_dsn, "SELECT pg_terminate_backend($1)", pid)


def test_a_commit_after_the_connection_was_lost_is_refused_not_reported_made(postgres_dsn: str) -> None:
    conn = PgConnection(postgres_dsn)
    try:
        conn.execute("CREATE TABLE t (x BIGINT)")
        conn.execute("BEGIN")
        conn.execute("INSERT INTO t (x) VALUES (?)", (1,))
        pid = int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])
        _terminate(postgres_dsn, pid)
        with pytest.raises(LedgerRefusing):
            # the next statement, or the commit itself, finds the connection gone: refused in words
            conn.execute("INSERT INTO t (x) VALUES (?)", (2,))
            conn.execute("COMMIT")
        conn.execute("ROLLBACK")  # what the writer does then: nothing left to undo, no error
        assert not conn.in_transaction
        assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 0  # connected again: nothing was made
    finally:
        conn.close()


def test_a_commit_on_a_connection_lost_between_statements_is_refused(postgres_dsn: str) -> None:
    conn = PgConnection(postgres_dsn)
    try:
        conn.execute("CREATE TABLE t (x BIGINT)")
        conn.execute("BEGIN")
        conn.execute("INSERT INTO t (x) VALUES (?)", (1,))
        conn.run(conn.raw.close())  # the connection goes between the last statement and the commit
        with pytest.raises(LedgerRefusing, match="before the commit"):
            conn.execute("COMMIT")
        assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 0
    finally:
        conn.close()


def test_a_commit_the_database_answers_with_rollback_is_refused(postgres_dsn: str) -> None:
    """PostgreSQL answers the COMMIT of a transaction an error aborted with ROLLBACK, not an error."""
    conn = PgConnection(postgres_dsn)
    try:
        conn.execute("CREATE TABLE t (x TEXT)")
        conn.execute("BEGIN")
        conn.execute("INSERT INTO t (x) VALUES ('kept?')")
        with pytest.raises(Exception):  # noqa: B017 - any error of the driver's
            conn.execute("INSERT INTO t (x) VALUES (?)", ("bad\x00",))
        with pytest.raises(LedgerRefusing, match="rolled the transaction back"):
            conn.execute("COMMIT")
        assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 0
    finally:
        conn.close()


def test_the_database_clock_leaves_out_the_wait_for_the_write_lock() -> None:
    """A batch that waited 1.7 s for the lock read the database's clock at the end of the wait: the
    offset measured is the true one (0 here), not half the wait."""
    from engine.ledger.pg.store import DatabaseClock

    clock = DatabaseClock()
    sent = 1_000_000 * 1_000_000  # ns
    received = sent + 1_702 * 1_000_000  # 1.702 s later: 1.7 s of it waiting, 2 ms of travel
    clock.observe(database_ms=received // 1_000_000 - 1, sent_ns=sent, received_ns=received, waited_ms=1_700)
    assert clock.offset_ms == 0


def test_a_chained_commit_begins_the_next_transaction_and_a_connection_lost_meanwhile_is_made_again(
        postgres_dsn: str) -> None:
    """``commit(chain=True)`` (COMMIT AND CHAIN) commits and begins the next transaction in one
    round trip: the next ``begin`` sends nothing. If the server closed the connection in between
    (a restart, a failover, an idle-in-transaction timeout), ``begin`` connects again and
    begins there, as a plain BEGIN does: the batch is not refused."""
    conn = PgConnection(postgres_dsn)
    try:
        conn.execute("CREATE TABLE t (x BIGINT)")
        conn.begin()
        conn.execute("INSERT INTO t (x) VALUES (?)", (1,))
        conn.commit(chain=True)
        sent = conn.round_trips
        conn.begin()
        assert conn.round_trips == sent and conn.in_transaction  # nothing sent: the chain began it
        conn.execute("INSERT INTO t (x) VALUES (?)", (100,))
        conn.execute("ROLLBACK")  # a transaction indeed: what it wrote is undone
        assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 1
        conn.begin()
        conn.execute("INSERT INTO t (x) VALUES (?)", (2,))
        pid = int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])
        conn.commit(chain=True)
        _terminate(postgres_dsn, pid)  # the chained transaction's connection goes while idle
        conn.begin()
        assert int(conn.execute("SELECT pg_backend_pid()").fetchone()[0]) != pid
        conn.execute("INSERT INTO t (x) VALUES (?)", (3,))
        conn.commit()
        conn.begin()  # a plain commit chained nothing: this one is a BEGIN
        assert conn.execute("SELECT sum(x), count(*) FROM t").fetchone() == (6, 3)
        conn.execute("ROLLBACK")
    finally:
        conn.close()
