"""A throwaway MariaDB server for the tests: own data folder, free port, socket and root password.

It never touches the machine's own server: a fresh data folder made by mariadb-install-db in a
new temporary directory, 127.0.0.1 on a port nothing listens on, its own socket, pid file and
temporary-file folder, no option files read (--no-defaults), and a root password generated for
this server alone. Several can run at once (one per pytest-xdist worker).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import URL, create_engine
from sqlalchemy.exc import DBAPIError

# mariadbd and mariadb-install-db live here on Debian, often outside a non-root user's PATH.
SBIN_FOLDERS = ("/usr/sbin", "/usr/local/sbin")
# Small buffers start fast; flushing the log once a second (not per commit) survives a killed
# mariadbd, which is all a test server meets, and makes the many small test commits cheap.
SERVER_OPTIONS = (
    "--innodb-log-file-size=16M",
    "--innodb-buffer-pool-size=64M",
    "--innodb-flush-log-at-trx-commit=2",
)
START_ATTEMPTS = 3  # a free port can be taken by someone else before mariadbd binds it


class MariaDBUnavailable(RuntimeError):
    """mariadbd or mariadb-install-db is missing, or the server would not start."""


def find_program(name: str) -> str | None:
    """Path of a MariaDB program on PATH or in the sbin folders; None when it is absent."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *SBIN_FOLDERS])
    return shutil.which(name, path=search)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_as_options() -> list[str]:
    """--user=root when we are root: mariadbd refuses to run as root without being told."""
    return ["--user=root"] if os.geteuid() == 0 else []


def parent_death_prefix() -> list[str]:
    """setpriv --pdeathsig: the server gets SIGTERM if the test process dies without cleaning up."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []


def password_sql(password: str) -> str:
    """Bootstrap SQL giving every root account this password (grant tables are off then)."""
    return (
        "UPDATE mysql.global_priv SET priv = JSON_SET(priv, '$.plugin', 'mysql_native_password',"
        f" '$.authentication_string', PASSWORD('{password}')) WHERE User = 'root';\n"
    )


@dataclass
class PrivateMariaDB:
    """One mariadbd of the tests' own, on its own data folder, port and socket."""

    folder: Path
    port: int
    password: str
    process: subprocess.Popen[bytes] | None = None

    @classmethod
    def launch(cls) -> PrivateMariaDB:
        """Install a fresh data folder in a new temporary directory and start a server on it."""
        mariadbd, install_db = find_program("mariadbd"), find_program("mariadb-install-db")
        if not (mariadbd and install_db):
            raise MariaDBUnavailable("mariadbd and mariadb-install-db are not installed")
        folder = Path(tempfile.mkdtemp(prefix="lk-mdb-"))  # short: a socket path has 107 bytes
        server = cls(folder, free_port(), secrets.token_hex(16))
        try:
            server.install(install_db)
            server.start_on_a_free_port()
        except BaseException:
            server.remove()
            raise
        return server

    def install(self, install_db: str) -> None:
        """Create the system tables with root's password already set; nothing listens yet."""
        init_file = self.folder / "set-root-password.sql"
        init_file.write_text(password_sql(self.password))
        command = [
            install_db, "--no-defaults", f"--datadir={self.folder / 'data'}",
            "--auth-root-authentication-method=normal", "--skip-test-db",
            f"--extra-file={init_file}", self.tmpdir_option(), *run_as_options(),
            *SERVER_OPTIONS,
        ]  # fmt: skip
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=180)
        finally:
            init_file.unlink(missing_ok=True)  # the password stays in memory only
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip()[-500:]
            raise MariaDBUnavailable(f"mariadb-install-db failed: {tail}")

    def tmpdir_option(self) -> str:
        """--tmpdir in the server's own folder. In the shared /tmp, two bootstraps at once (two
        xdist workers) failed: one removed the other's #sql-temptable-* files mid-install."""
        tmpdir = self.folder / "tmp"
        tmpdir.mkdir(exist_ok=True)
        return f"--tmpdir={tmpdir}"

    def start_on_a_free_port(self) -> None:
        """Start, trying another free port when the chosen one was taken meanwhile."""
        for attempt in range(START_ATTEMPTS):
            try:
                self.start()
                return
            except MariaDBUnavailable:
                if attempt == START_ATTEMPTS - 1 or "already in use" not in self.log_tail():
                    raise
                self.port = free_port()

    def url(self, database: str) -> str:
        """SQLAlchemy URL of a database on this server, as root with the password."""
        url = URL.create(
            "mysql+pymysql",
            username="root",
            password=self.password,
            host="127.0.0.1",
            port=self.port,
            database=database,
        )
        return url.render_as_string(hide_password=False)

    def start(self, timeout: float = 60) -> None:
        """Start the server on its data folder (crash recovery included) and wait for it."""
        mariadbd = find_program("mariadbd")
        if mariadbd is None:
            raise MariaDBUnavailable("mariadbd is not installed")
        command = [
            *parent_death_prefix(), mariadbd, "--no-defaults",
            f"--datadir={self.folder / 'data'}", f"--port={self.port}",
            "--bind-address=127.0.0.1", "--skip-name-resolve",
            f"--socket={self.folder / 'sock'}", f"--pid-file={self.folder / 'pid'}",
            "--skip-log-bin", "--local-infile=1", self.tmpdir_option(), *run_as_options(),
            *SERVER_OPTIONS,
        ]  # fmt: skip
        with (self.folder / "server.log").open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise MariaDBUnavailable(f"private mariadbd did not start: {self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self) -> str:
        """The last lines the server wrote."""
        log = self.folder / "server.log"
        return log.read_text(errors="replace")[-800:] if log.exists() else ""

    def answers(self) -> bool:
        """True when the server accepts a connection."""
        engine = create_engine(self.url("mysql"))
        try:
            with engine.connect():
                return True
        except DBAPIError:
            return False
        finally:
            engine.dispose()

    def kill(self) -> None:
        """kill -9: the server dies mid-statement, as in a crash."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=60)

    def stop(self) -> None:
        """A clean shutdown (SIGTERM), then SIGKILL if it does not end within a minute."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()

    def remove(self) -> None:
        """Stop the server and delete its folder: data, socket, log and all."""
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
