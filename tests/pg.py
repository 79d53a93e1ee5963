"""A throwaway PostgreSQL cluster for the test run (issue 20's ledger tests).

``start_cluster()`` runs initdb into a fresh temporary folder and starts a server on a free
loopback port: listening on 127.0.0.1 only, its unix socket in that folder (never in
/var/run/postgresql), trust authentication, fsync, synchronous_commit and full_page_writes off
(nothing here has to survive a power cut), max_connections 300 (several gateways a test, each
with its pool). ``fresh_database(admin_dsn)`` creates a new, empty, uniquely named database on
it and returns its dsn: each test gets its own.

PostgreSQL refuses to run as root: when the tests run as root, every binary runs as the
``postgres`` user (through ``setpriv``), and the folder is handed to that user. The server is
this process's child, started with a parent-death signal: if the test process is killed, the
kernel stops the server too (SIGQUIT, PostgreSQL's immediate shutdown). A normal exit stops it
through the fixture's finalizer, or else the ``atexit`` hook registered here.

Measured on the 2-core test machine (PostgreSQL 15.18, load average 1-3, 8 clusters, each
figure min-max): in /dev/shm, ``start_cluster`` 0.42-0.47 s (initdb 0.38-0.43 s, the server's
start 31-33 ms), ``fresh_database`` 26-33 ms (the median of 10 a cluster), ``restart`` 134-138 ms,
``stop`` with the folder's removal 151-159 ms; with other suites running (load average 3),
``start_cluster`` 1.2-1.9 s and a fresh database 91-144 ms. On the disk (shared with other suites' writes)
``start_cluster`` took 0.49-1.19 s and a fresh database 34-270 ms: hence /dev/shm when it has room.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import glob
import os
import pwd
import queue
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

#: What a cluster needs, all three in one folder.
BINARIES = ("initdb", "pg_ctl", "postgres")
#: Where Debian and Ubuntu install them (the newest version first), besides PATH.
SEARCH_GLOB = "/usr/lib/postgresql/*/bin"
#: The user the binaries run as when the tests run as root.
OWNER = "postgres"

MISSING = ("PostgreSQL binaries (initdb, pg_ctl, postgres) not found on PATH or in /usr/lib/postgresql/*/bin: "
           "the PostgreSQL ledger tests are skipped; install PostgreSQL to run them")
NO_OWNER = (f"running as root, and there is no '{OWNER}' user to run PostgreSQL as (it refuses to run as root): "
            "the PostgreSQL ledger tests are skipped; install PostgreSQL (its package creates the user) to run them")
NO_SETPRIV = ("running as root, and 'setpriv' (util-linux) is not found to run PostgreSQL as the 'postgres' user: "
              "the PostgreSQL ledger tests are skipped; install util-linux to run them")

#: The server's settings: fast, loopback only, room for several gateways a test.
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",
    "shared_buffers": "64MB",
    "logging_collector": "off",
    "log_min_messages": "warning",
    "log_line_prefix": "'%m [%p] '",
}

T = TypeVar("T")

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_bindir(path: str | None = None, search_glob: str = SEARCH_GLOB) -> Path | None:
    """The first folder of ``path`` (PATH's format; the environment's when None), then of
    ``search_glob`` (the newest version first), that holds initdb, pg_ctl and postgres; None
    when none does."""
    if path is None:
        path = os.environ.get("PATH", "")
    candidates = [Path(p) for p in path.split(os.pathsep) if p]

    def version(folder: str) -> tuple[int, ...]:
        name = Path(folder).parent.name
        return tuple(int(part) for part in name.split(".") if part.isdigit()) or (0,)

    candidates += [Path(p) for p in sorted(glob.glob(search_glob), key=version, reverse=True)]
    for folder in candidates:
        if all(_is_executable(folder / name) for name in BINARIES):
            return folder
    return None


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@dataclass(frozen=True)
class Availability:
    """Whether the PostgreSQL tests can run here, and what to do when they cannot:
    ``run`` (``bindir`` is set), ``skip``, or ``fail`` (in CI, a missing server is an error)."""

    action: Literal["run", "skip", "fail"]
    reason: str
    bindir: Path | None = None


def in_ci(environ: Mapping[str, str]) -> bool:
    return environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def availability(environ: Mapping[str, str] | None = None, *, search_glob: str = SEARCH_GLOB,
                 is_root: bool | None = None, user_exists: Callable[[str], bool] = _user_exists,
                 setpriv: str | None = "") -> Availability:
    """The decision for an environment (PATH and CI read from ``environ``; the process's when
    None). The other arguments stand in for the machine in tests; ``setpriv=""`` looks it up."""
    env = os.environ if environ is None else environ
    bindir = find_bindir(env.get("PATH", ""), search_glob)
    if is_root is None:
        is_root = os.geteuid() == 0
    if setpriv == "":
        setpriv = shutil.which("setpriv", path=env.get("PATH", "") or None)
    reason = ""
    if bindir is None:
        reason = MISSING
    elif is_root and not user_exists(OWNER):
        reason = NO_OWNER
    elif is_root and not setpriv:
        reason = NO_SETPRIV
    if not reason:
        return Availability("run", f"PostgreSQL binaries in {bindir}", bindir)
    return Availability("fail" if in_ci(env) else "skip", reason)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _clean_env() -> dict[str, str]:
    """The environment for the binaries: the developer's PG* variables (PGDATA, PGPORT, ...)
    kept out, messages in English (the log is read for 'address already in use')."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    return env


class ClusterError(RuntimeError):
    pass


class _Spawner:
    """Starts the servers from one thread that lives as long as the process.

    The parent-death signal fires when the *thread* that forked the server ends, not the
    process: a server started from a short-lived thread (``asyncio.to_thread(cluster.restart)``
    in a test under load) would be killed when the executor retired that thread."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _serve(self) -> None:
        while True:
            job, future = self._jobs.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(job())
                except BaseException as e:
                    future.set_exception(e)

    def run(self, job: Callable[[], T]) -> T:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="postgres-spawner", daemon=True)
                self._thread.start()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((job, future))
        return future.result()


_SPAWNER = _Spawner()


class Cluster:
    """One PostgreSQL server on 127.0.0.1:``port`` with its data in ``data_dir``."""

    def __init__(self, bindir: Path, base: Path, port: int, *, as_owner: bool,
                 settings: Mapping[str, str] | None = None) -> None:
        self.bindir = bindir
        self.base = base
        self.data_dir = base / "data"
        self.log_path = base / "postgresql.log"
        self.port = port
        self.as_owner = as_owner
        self.settings = {**SETTINGS, **(settings or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds: float | None = None  # the last start's, initdb excluded
        self.initdb_seconds: float | None = None
        self._removed = False

    # -- addresses

    @property
    def dsn(self) -> str:
        """The administrator's dsn (the ``postgres`` database, as the ``postgres`` role)."""
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- processes

    def _command(self, *args: str, pdeathsig: bool = False) -> list[str]:
        """``args`` as the user that owns the cluster: ``postgres`` under root, else this one."""
        prefix: list[str] = []
        setpriv = shutil.which("setpriv")
        if self.as_owner:
            if setpriv is None:
                raise ClusterError(NO_SETPRIV)
            prefix = [setpriv, f"--reuid={OWNER}", f"--regid={OWNER}", "--init-groups"]
        elif pdeathsig and setpriv is not None:
            prefix = [setpriv]
        if pdeathsig and prefix:
            prefix.append("--pdeathsig=SIGQUIT")
        return [*prefix, "--", *args] if prefix else list(args)

    def _run(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(self._command(*args), cwd=self.base, env=_clean_env(), capture_output=True,
                              text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise ClusterError(f"{Path(args[0]).name} failed ({done.returncode}): "
                               f"{(done.stderr or done.stdout).strip()[-2000:]}")
        return done

    def initdb(self) -> None:
        began = time.perf_counter()
        self._run(str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", "postgres", "-A", "trust",
                  "-E", "UTF8", "--no-locale", "--no-sync")
        self.initdb_seconds = time.perf_counter() - began
        # Trust, for the socket in the folder and 127.0.0.1 only (initdb's also allows ::1).
        (self.data_dir / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 trust\n", encoding="utf-8")
        self._write_settings()

    def _write_settings(self) -> None:
        """postgresql.auto.conf (read last, so it wins over postgresql.conf): the port and the
        socket's folder too, so that pg_ctl and a restart find the same server."""
        settings = {**self.settings, "port": str(self.port), "unix_socket_directories": f"'{self.base}'"}
        text = "".join(f"{name} = {value}\n" for name, value in settings.items())
        (self.data_dir / "postgresql.auto.conf").write_text(text, encoding="utf-8")
        if self.as_owner:
            pw = pwd.getpwnam(OWNER)
            for path in (self.data_dir / "pg_hba.conf", self.data_dir / "postgresql.auto.conf"):
                os.chown(path, pw.pw_uid, pw.pw_gid)

    def _ready(self) -> bool:
        """The postmaster's pid file says ``ready`` (what ``pg_ctl start -w`` waits for), and
        is our process's (a stale file from a killed server says ready too)."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text(encoding="utf-8").splitlines()
        except (FileNotFoundError, UnicodeDecodeError):
            return False
        assert self.proc is not None
        return len(lines) >= 8 and lines[0].strip() == str(self.proc.pid) and lines[7].strip() == "ready"

    def _log_tail(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace").strip()[-2000:]
        except FileNotFoundError:
            return ""

    def start(self) -> None:
        """Start the server on its port and wait until it accepts connections."""
        if self.running:
            return
        began = time.perf_counter()
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child's stdout; closed below
        try:
            # Its own session: a Ctrl-C at the terminal reaches pytest, whose finalizer stops
            # the server, rather than the server first.
            command = self._command(str(self.bindir / "postgres"), "-D", str(self.data_dir), pdeathsig=True)
            self.proc = _SPAWNER.run(lambda: subprocess.Popen(
                command, cwd=self.base, env=_clean_env(), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True))
        finally:
            log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._ready():
            if self.proc.poll() is not None:
                raise ClusterError(f"postgres exited with code {self.proc.returncode} on start "
                                   f"(port {self.port}): {self._log_tail(offset)}")
            if time.monotonic() > deadline:
                self._kill()
                raise ClusterError(f"postgres was not ready within {START_TIMEOUT_S:.0f} s: {self._log_tail(offset)}")
            time.sleep(0.01)
        self.start_seconds = time.perf_counter() - began

    def _stop(self, mode: Literal["smart", "fast", "immediate"]) -> None:
        if not self.running:
            self._reap()
            return
        try:
            self._run(str(self.bindir / "pg_ctl"), "stop", "-D", str(self.data_dir), "-m", mode, "-w",
                      "-t", str(int(STOP_TIMEOUT_S)), timeout=STOP_TIMEOUT_S + 10)
        except (ClusterError, subprocess.TimeoutExpired):
            # pg_ctl could not (its pid file gone, say): the signal it would have sent.
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal({"smart": signal.SIGTERM, "fast": signal.SIGINT,
                                       "immediate": signal.SIGQUIT}[mode])
        self._reap()

    def _reap(self) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._kill()
        self.proc = None

    def _kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop_fast(self) -> None:
        """Fast shutdown (sessions ended, work rolled back, a checkpoint): the data stays."""
        self._stop("fast")

    def crash(self) -> None:
        """Immediate shutdown: the processes quit at once, without a checkpoint, as in a crash;
        the next start recovers from the WAL. With synchronous_commit off (the default here) the
        transactions committed in the last few hundred milliseconds can be lost, as a real
        server so configured would lose them: a test that counts on every commit surviving a
        crash starts its cluster with ``settings={"synchronous_commit": "on"}``."""
        self._stop("immediate")

    def restart(self) -> None:
        """Stop (fast) then start again on the same port, with the same data."""
        self.stop_fast()
        deadline = time.monotonic() + 10
        while True:
            try:
                self.start()
                return
            except ClusterError as e:
                # The port may linger a moment in another process's hands: try again briefly.
                if "already in use" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        """Stop the server for good and remove its folder (the end of the run)."""
        self.stop_fast()
        if not self._removed:
            shutil.rmtree(self.base, ignore_errors=True)
            self._removed = True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_in(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="utf-8").split()[0])
    except (OSError, ValueError, IndexError):
        return None


#: Memory-backed, where there is room: on the 2-core test machine (disk shared with other
#: suites), a fresh database took 250 ms on disk against 27 ms here, initdb 1 s against 0.4 s.
SHM = Path("/dev/shm")
SHM_ROOM = 1 << 30


def base_parent() -> Path:
    """Where the clusters' folders go: /dev/shm when it is writable with 1 GiB free (a cluster
    is 40 MB, a database 8 MB, dropped after its test), else the temporary folder."""
    try:
        if SHM.is_dir() and os.access(SHM, os.W_OK | os.X_OK):
            vfs = os.statvfs(SHM)
            if vfs.f_bavail * vfs.f_frsize >= SHM_ROOM:
                return SHM
    except OSError:
        pass
    return Path(tempfile.gettempdir())


def sweep_stale(tmp: Path | None = None) -> list[Path]:
    """Remove the folders of clusters whose test process was killed (no atexit ran; the server
    itself went with its parent): neither the owner's pid nor the server's is alive. The removed."""
    removed = []
    for base in Path(tmp or base_parent()).glob("budgeteer-pg-*"):
        owner = _pid_in(base / "owner.pid")
        server = _pid_in(base / "data" / "postmaster.pid")
        if owner is None or _alive(owner) or (server is not None and _alive(server)):
            continue
        shutil.rmtree(base, ignore_errors=True)
        removed.append(base)
    return removed


def start_cluster(bindir: Path | None = None, *, label: str = "", settings: Mapping[str, str] | None = None) -> Cluster:
    """initdb a fresh cluster in a temporary folder and start it on a free loopback port.
    ``label`` goes into the folder's name (the xdist worker's id, say); ``settings`` (name to
    value as postgresql.conf writes it) add to or override ``SETTINGS``."""
    if bindir is None:
        found = availability()
        if found.bindir is None:
            raise ClusterError(found.reason)
        bindir = found.bindir
    as_owner = os.geteuid() == 0
    # Not under pytest's tmp_path: its folders are root's alone (0700), where the postgres user
    # could not enter.
    parent = base_parent()
    sweep_stale(parent)
    base = Path(tempfile.mkdtemp(prefix=f"budgeteer-pg-{label + '-' if label else ''}", dir=parent))
    (base / "owner.pid").write_text(f"{os.getpid()}\n", encoding="utf-8")
    if as_owner:
        pw = pwd.getpwnam(OWNER)
        os.chown(base, pw.pw_uid, pw.pw_gid)
    cluster = Cluster(bindir, base, free_port(), as_owner=as_owner, settings=settings)
    atexit.register(cluster.stop)
    try:
        cluster.initdb()
        for attempt in range(5):
            try:
                cluster.start()
                break
            except ClusterError as e:
                # Another process took the free port between our probe and the server's bind.
                if "already in use" not in str(e) or attempt == 4:
                    raise
                cluster.port = free_port()
                cluster._write_settings()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _in_thread(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to its end on an event loop of its own in a thread of its own: the
    caller's thread may have an event loop set (pytest-asyncio's), which this leaves alone."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(asyncio.run(make()))
        except BaseException as e:
            error.append(e)

    thread = threading.Thread(target=run, name="fresh-database")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


def _on(dsn: str, fetching: bool, sql: str, args: tuple[Any, ...]) -> Any:
    import asyncpg

    async def run() -> Any:
        conn = await asyncpg.connect(dsn, timeout=30)
        try:
            return list(await conn.fetch(sql, *args)) if fetching else await conn.execute(sql, *args)
        finally:
            await conn.close()

    return _in_thread(run)


def execute(dsn: str, sql: str, *args: Any) -> None:
    """Run ``sql`` on a connection of its own to ``dsn``, from any thread, whether or not an
    event loop runs there; without ``args`` it may be several statements."""
    _on(dsn, False, sql, args)


def fetch(dsn: str, sql: str, *args: Any) -> list[Any]:
    """The rows of one query, as ``execute`` runs it."""
    rows: list[Any] = _on(dsn, True, sql, args)
    return rows


def fresh_database(admin_dsn: str, *, prefix: str = "test") -> str:
    """CREATE a new, empty database with a unique name on the server of ``admin_dsn``; its dsn."""
    name = f"{prefix}_{uuid.uuid4().hex[:16]}"
    execute(admin_dsn, f'CREATE DATABASE "{name}" TEMPLATE template0')
    return _with_database(admin_dsn, name)


def drop_database(admin_dsn: str, dsn: str) -> None:
    """DROP the database of ``dsn``, ending any session still on it (a test's leftovers)."""
    execute(admin_dsn, f'DROP DATABASE IF EXISTS "{urlsplit(dsn).path.lstrip("/")}" WITH (FORCE)')


class Tally:
    """The PostgreSQL tests' outcomes, from their reports, for the run's closing line."""

    def __init__(self) -> None:
        self.ran = 0
        self.skipped = 0
        self.failed = 0  # could not get a cluster (CI without PostgreSQL, a start that failed)
        self.reasons: set[str] = set()

    def add(self, report: Any) -> None:
        """One report (a pytest.TestReport) of a test that uses the cluster."""
        if report.skipped:
            self.skipped += report.when in ("setup", "call")
            if isinstance(report.longrepr, tuple):
                self.reasons.add(str(report.longrepr[2]).removeprefix("Skipped: "))
        elif report.when == "setup" and report.failed:
            self.failed += 1
            text = str(report.longrepr).strip() if report.longrepr else ""
            self.reasons.add(text.splitlines()[-1].removeprefix("E   ").strip() if text else "")
        elif report.when == "call":
            self.ran += 1

    def summary(self) -> str | None:
        """One line: how many ran, how many were skipped or could not start, and why; None when
        the run selected no PostgreSQL test."""
        if not (self.ran or self.skipped or self.failed):
            return None
        parts = []
        if self.ran:
            parts.append(f"{self.ran} ran against a throwaway cluster")
        if self.skipped:
            parts.append(f"{self.skipped} skipped")
        if self.failed:
            parts.append(f"{self.failed} could not get a cluster")
        reasons = sorted(r for r in self.reasons if r)
        why = f": {'; '.join(reasons)}" if (self.skipped or self.failed) and reasons else ""
        return f"PostgreSQL ledger tests: {', '.join(parts)}{why}"
