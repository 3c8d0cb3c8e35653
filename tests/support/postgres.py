"""A real PostgreSQL server, initialised and started by the test suite on a free port.

The cluster lives in a temporary directory (data, unix socket, log) and listens on
127.0.0.1 only; the PostgreSQL that may run on the machine is never touched.
"""

from __future__ import annotations

import glob
import os
import pwd
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from .ports import free_port
from .server import ServerProcess

HOST = "127.0.0.1"
SUPERUSER = "postgres"
_PORT_TAKEN_MARKERS = ("could not bind", "Address already in use")
_START_ATTEMPTS = 5
_POLL_INTERVAL = 0.05


class DatabaseError(RuntimeError):
    """The server did not start or stop as asked; the message carries its output."""


class _PortTakenError(DatabaseError):
    pass


def _find_bindir() -> Path | None:
    """The directory holding initdb, pg_ctl and friends, or None when not installed."""
    found = shutil.which("initdb")
    if found is not None:
        # /usr/local/bin/initdb is a symlink into the versioned directory, where the
        # other tools (createdb, pg_isready) live too.
        bindir = Path(found).resolve().parent
        if (bindir / "pg_ctl").exists():
            return bindir
    # Debian keeps the server tools off PATH, one directory per major version.
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda path: int(Path(path).parts[-3]) if Path(path).parts[-3].isdigit() else 0,
    )
    for candidate in reversed(candidates):
        bindir = Path(candidate).parent
        if (bindir / "pg_ctl").exists():
            return bindir
    return None


def _clean_environment() -> dict[str, str]:
    # PGPORT, PGHOST, PGDATA… from the developer's shell would point the tools at
    # another server; C locale keeps initdb from depending on installed locales.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    return env


class Postgres(ServerProcess):
    """A PostgreSQL cluster in its own temporary directory, with database `iotflow`.

    initdb and pg_ctl refuse to run as root, so as root they run as the `postgres`
    account, and the directory is handed to it. Client tools (createdb, pg_isready)
    connect over TCP with trust auth and do not care who runs them.
    """

    def __init__(
        self,
        *,
        database: str = "iotflow",
        start_timeout: float = 120.0,
        stop_timeout: float = 60.0,
    ) -> None:
        bindir = _find_bindir()
        if bindir is None:
            pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        self.bindir = bindir
        self.database = database
        self.user = SUPERUSER
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._owner = self._server_account()
        self.directory = Path(tempfile.mkdtemp(prefix="iotflow-pg-"))
        self.data_dir = self.directory / "data"
        self.log_path = self.directory / "postgres.log"
        self._port: int | None = None
        self._running = False

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        if self._port is None:
            raise DatabaseError("the server has no port before its first start()")
        return self._port

    @property
    def dsn(self) -> str:
        return self.dsn_for(self.database)

    @property
    def running(self) -> bool:
        return self._running

    def dsn_for(self, database: str) -> str:
        return f"postgresql://{self.user}@{HOST}:{self.port}/{database}"

    def start(self) -> None:
        if self._running:
            raise DatabaseError(f"the server is already running on port {self.port}")
        self._give_directory_to_server()
        first_start = not self.data_dir.exists()
        if first_start:
            self._initdb()
        attempts = 1 if self._port is not None else _START_ATTEMPTS
        for attempt in range(1, attempts + 1):
            port = self._port if self._port is not None else free_port()
            try:
                self._pg_ctl_start(port)
            except _PortTakenError:
                if attempt == attempts:
                    raise
                continue
            self._port = port
            break
        self._running = True
        self._wait_ready()
        if first_start:
            self.create_database(self.database)

    def stop(self) -> None:
        self._running = False
        # The pid file, not our flag, says whether a server runs: a start that timed
        # out may have left one behind, and it must not outlive the suite.
        if not (self.data_dir / "postmaster.pid").exists():
            return
        self._run_as_server(
            [
                str(self.bindir / "pg_ctl"),
                "stop",
                "-D",
                str(self.data_dir),
                "-m",
                "fast",
                "-w",
                "-t",
                str(int(self.stop_timeout)),
            ],
            what="pg_ctl stop",
        )

    def create_database(self, name: str) -> str:
        """Create another database (isolation for one test module); return its DSN."""
        self._run(
            [
                str(self.bindir / "createdb"),
                "-h",
                HOST,
                "-p",
                str(self.port),
                "-U",
                self.user,
                name,
            ],
            what=f"createdb {name}",
        )
        return self.dsn_for(name)

    def log_text(self) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def __repr__(self) -> str:
        where = f"{HOST}:{self._port}" if self._port is not None else "not started"
        return f"<Postgres {where} running={self._running} dir={self.directory}>"

    @staticmethod
    def _server_account() -> pwd.struct_passwd | None:
        """The account the server tools run as: None for ourselves, `postgres` as root."""
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam(SUPERUSER)
        except KeyError:
            raise DatabaseError(
                "running as root, and initdb/pg_ctl refuse root: a `postgres` account is"
                " needed to run them"
            ) from None

    def _give_directory_to_server(self) -> None:
        if self._owner is None:
            return
        for root, dirs, files in os.walk(self.directory):
            os.chown(root, self._owner.pw_uid, self._owner.pw_gid)
            for name in dirs + files:
                os.chown(os.path.join(root, name), self._owner.pw_uid, self._owner.pw_gid)

    def _initdb(self) -> None:
        self._run_as_server(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                # Durability of a throw-away cluster is not worth the fsyncs.
                "--no-sync",
            ],
            what="initdb",
        )

    def _pg_ctl_start(self, port: int) -> None:
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        options = shlex.join(
            [
                "-k",
                str(self.directory),
                "-p",
                str(port),
                "-c",
                f"listen_addresses={HOST}",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]
        )
        try:
            self._run_as_server(
                [
                    str(self.bindir / "pg_ctl"),
                    "start",
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.log_path),
                    "-o",
                    options,
                    # pg_ctl itself waits until the server accepts connections.
                    "-w",
                    "-t",
                    str(int(self.start_timeout)),
                ],
                what="pg_ctl start",
            )
        except DatabaseError as error:
            log = self.log_text()[log_offset:]
            if any(marker in log for marker in _PORT_TAKEN_MARKERS):
                raise _PortTakenError(f"{error}\n{log}") from None
            raise DatabaseError(f"{error}\nserver log:\n{log}") from None

    def _wait_ready(self) -> None:
        # pg_ctl -w already waited; pg_isready over TCP confirms the listener we will
        # hand out in the DSN (pg_ctl may have checked the unix socket).
        deadline = time.monotonic() + self.start_timeout
        command = [
            str(self.bindir / "pg_isready"),
            "-h",
            HOST,
            "-p",
            str(self.port),
            "-U",
            self.user,
            "-d",
            "postgres",
            "-t",
            "5",
        ]
        while True:
            result = subprocess.run(
                command, capture_output=True, env=_clean_environment(), check=False
            )
            if result.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise DatabaseError(
                    f"PostgreSQL did not accept connections on {HOST}:{self.port} within"
                    f" {self.start_timeout}s\n{self.log_text()}"
                )
            time.sleep(_POLL_INTERVAL)

    def _run_as_server(self, command: Sequence[str], *, what: str) -> None:
        if self._owner is None:
            self._run(command, what=what)
            return
        runuser = shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin")
        if runuser is not None:
            self._run([runuser, "-u", self._owner.pw_name, "--", *command], what=what)
        else:
            self._run(
                ["su", self._owner.pw_name, "-s", "/bin/sh", "-c", shlex.join(command)],
                what=what,
            )

    def _run(self, command: Sequence[str], *, what: str) -> None:
        result = subprocess.run(
            list(command),
            # The server account cannot necessarily enter the caller's cwd.
            cwd=self.directory,
            env=_clean_environment(),
            # pg_ctl start redirects the server to the log file, so nothing keeps
            # these pipes open after pg_ctl returns.
            capture_output=True,
            timeout=self.start_timeout + 30,
            check=False,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode("utf-8", errors="replace")
            raise DatabaseError(f"{what} failed with status {result.returncode}:\n{output}")
