"""What the room server keeps across a restart: revocations, closed rooms, bindings.

Three kinds of records, each with an end:

* **revocations** (kicks): a token id (``jti``, every room) and a subject in
  one room, refused until the kicked token's expiry;
* **closed rooms**: joins refused until a moderator creates the room again
  (the oldest of more than :data:`MAX_CLOSED_ROOMS` are forgotten);
* **bindings**: ``(room, key) -> subject`` until an expiry: a publisher's
  stream id (key ``stream:<id>``) and a member id (key ``member:<id>``) belong
  to the subject that first took them, for its token's lifetime; another
  subject cannot claim the stream id or resume the member id meanwhile. A
  subject keeps at most :data:`MAX_BINDINGS_PER_SUBJECT` of each kind per room
  (its oldest are released first).

:class:`RoomStore` is the interface (small on purpose: the scale-out puts the
same records in Redis); :class:`MemoryStore` keeps them in this process (what
every read uses), :class:`SqliteStore` also writes them through to a SQLite
file (stdlib ``sqlite3``, WAL) and loads them on start. :func:`open_store`
picks one from the configuration: the file ``server-<fingerprint>.sqlite3``
in ``server.data_dir`` (default ``$XDG_STATE_HOME/posewire`` or
``~/.local/state/posewire``, created 0700), one file per token secret (the
fingerprint is an HMAC of the secret: records only mean something for the
tokens of that secret). A server whose secret is random (``--dev`` without a
secret) keeps them in memory: its tokens die with it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Final, Protocol, TypeVar

from pipeline.config import ServerConfig
from pipeline.errors import ConfigError

log = logging.getLogger("posewire.server")

MAX_CLOSED_ROOMS: Final = 10_000
MAX_REVOCATIONS: Final = 100_000
MAX_BINDINGS: Final = 200_000
MAX_BINDINGS_PER_SUBJECT: Final = 64
SCHEMA_VERSION: Final = 1
K = TypeVar("K")
WRITE_ERROR_LOG_INTERVAL_S: Final = 60.0


class RoomStore(Protocol):
    """The records a server must not forget on restart (see the module docstring)."""

    def revoke(self, room: str, subject: str, jti: str, until: float) -> None:
        """Refuse token ``jti`` (every room) and ``subject`` in ``room`` until ``until``."""

    def is_revoked(self, room: str, subject: str, jti: str, now: float) -> bool: ...

    def revocations(self) -> int:
        """Revoked token ids held (expired ones until the next :meth:`prune`)."""

    def close_room(self, room: str, at_ns: int) -> None: ...

    def reopen_room(self, room: str) -> None: ...

    def is_closed(self, room: str) -> bool: ...

    def bind(self, room: str, key: str, subject: str, until: float) -> None:
        """``key`` in ``room`` belongs to ``subject`` until ``until`` (extends, never shortens
        a binding of the same subject; replaces one of another subject: the caller checked
        with :meth:`bound_subject` that it expired)."""

    def bound_subject(self, room: str, key: str, now: float) -> str | None:
        """The subject ``key`` is bound to in ``room``, or None (never bound or expired)."""

    def prune(self, now: float) -> None:
        """Forget expired revocations and bindings."""

    def close(self) -> None: ...


def _kind(key: str) -> str:
    return key.split(":", 1)[0]


class MemoryStore:
    """A :class:`RoomStore` in this process's memory (bounded; see the module docstring)."""

    def __init__(self) -> None:
        self._jti: dict[str, float] = {}
        self._subject: dict[tuple[str, str], float] = {}
        self._closed: dict[str, int] = {}
        self._bindings: dict[tuple[str, str], tuple[str, float]] = {}
        self._by_subject: dict[tuple[str, str, str], dict[str, None]] = {}

    # ------------------------------------------------------------------ revocations

    def revoke(self, room: str, subject: str, jti: str, until: float) -> None:
        self._jti[jti] = max(self._jti.get(jti, 0.0), until)
        key = (room, subject)
        self._subject[key] = max(self._subject.get(key, 0.0), until)
        if len(self._jti) > MAX_REVOCATIONS or len(self._subject) > MAX_REVOCATIONS:
            self.prune(time.time())
            _trim(self._jti, MAX_REVOCATIONS)
            _trim(self._subject, MAX_REVOCATIONS)

    def is_revoked(self, room: str, subject: str, jti: str, now: float) -> bool:
        exp = self._jti.get(jti)
        if exp is not None and exp >= now:
            return True
        exp = self._subject.get((room, subject))
        return exp is not None and exp >= now

    def revocations(self) -> int:
        return len(self._jti)

    # ------------------------------------------------------------------ closed rooms

    def close_room(self, room: str, at_ns: int) -> None:
        self._closed.pop(room, None)
        self._closed[room] = at_ns
        while len(self._closed) > MAX_CLOSED_ROOMS:
            del self._closed[next(iter(self._closed))]

    def reopen_room(self, room: str) -> None:
        self._closed.pop(room, None)

    def is_closed(self, room: str) -> bool:
        return room in self._closed

    # ------------------------------------------------------------------ bindings

    def bind(self, room: str, key: str, subject: str, until: float) -> None:
        old = self._bindings.get((room, key))
        if old is not None:
            if old[0] == subject:
                until = max(until, old[1])
            self._unbind(room, key)
        self._bindings[(room, key)] = (subject, until)
        mine = self._by_subject.setdefault((room, subject, _kind(key)), {})
        mine[key] = None
        if len(mine) > MAX_BINDINGS_PER_SUBJECT:
            self._unbind(room, next(iter(mine)))
        if len(self._bindings) > MAX_BINDINGS:
            self.prune(time.time())
            while len(self._bindings) > MAX_BINDINGS:
                self._unbind(*next(iter(self._bindings)))

    def bound_subject(self, room: str, key: str, now: float) -> str | None:
        b = self._bindings.get((room, key))
        if b is None or b[1] < now:
            return None
        return b[0]

    def _unbind(self, room: str, key: str) -> None:
        b = self._bindings.pop((room, key), None)
        if b is None:
            return
        idx = (room, b[0], _kind(key))
        mine = self._by_subject.get(idx)
        if mine is not None:
            mine.pop(key, None)
            if not mine:
                del self._by_subject[idx]
        self._deleted(room, key)

    def _deleted(self, room: str, key: str) -> None:
        """A binding was dropped (a subclass forgets it too)."""

    # ------------------------------------------------------------------ upkeep

    def prune(self, now: float) -> None:
        self._jti = {k: v for k, v in self._jti.items() if v >= now}
        self._subject = {k: v for k, v in self._subject.items() if v >= now}
        for rk in [rk for rk, (_, until) in self._bindings.items() if until < now]:
            self._unbind(*rk)

    def close(self) -> None:
        pass


def _trim(d: dict[K, float], limit: int) -> None:
    """Drop the entries that end first until ``d`` has ``limit`` entries."""
    if len(d) <= limit:
        return
    for k, _ in sorted(d.items(), key=lambda kv: kv[1])[: len(d) - limit]:
        del d[k]


_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS revoked_jti (jti TEXT PRIMARY KEY, until REAL NOT NULL);
CREATE TABLE IF NOT EXISTS revoked_subject (
    room TEXT NOT NULL, subject TEXT NOT NULL, until REAL NOT NULL,
    PRIMARY KEY (room, subject));
CREATE TABLE IF NOT EXISTS closed_room (room TEXT PRIMARY KEY, closed_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS binding (
    room TEXT NOT NULL, key TEXT NOT NULL, subject TEXT NOT NULL, until REAL NOT NULL,
    seq INTEGER NOT NULL, PRIMARY KEY (room, key));
"""


class SqliteStore(MemoryStore):
    """A :class:`MemoryStore` written through to a SQLite file and loaded from it on start.

    Reads never touch the file. Writes are single autocommit statements in WAL
    mode with ``synchronous=NORMAL`` (no fsync per write: a power cut may lose
    the last writes, a process crash does not). A write that fails (disk full)
    is logged (at most once a minute) and the record is still kept in memory.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._loading = True
        self._write_errors = 0
        self._last_error_log = -1e9
        self._seq = 0
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            db = sqlite3.connect(path, isolation_level=None, timeout=0.2, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            db.execute(
                "INSERT OR IGNORE INTO meta (k, v) VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
            )
            self._db = db
            self._load(db)
        except (OSError, sqlite3.Error) as exc:
            if self._db is not None:
                self._db.close()
            raise ConfigError(
                [f"server.data_dir: cannot use the server store {str(path)!r}: {exc}"]
            ) from exc
        finally:
            self._loading = False

    def _load(self, db: sqlite3.Connection) -> None:
        now = time.time()
        db.execute("DELETE FROM revoked_jti WHERE until < ?", (now,))
        db.execute("DELETE FROM revoked_subject WHERE until < ?", (now,))
        db.execute("DELETE FROM binding WHERE until < ?", (now,))
        for jti, until in db.execute("SELECT jti, until FROM revoked_jti"):
            self._jti[str(jti)] = float(until)
        for room, subject, until in db.execute("SELECT room, subject, until FROM revoked_subject"):
            self._subject[(str(room), str(subject))] = float(until)
        for room, at_ns in db.execute("SELECT room, closed_ns FROM closed_room ORDER BY closed_ns"):
            MemoryStore.close_room(self, str(room), int(at_ns))
        rows = db.execute("SELECT room, key, subject, until, seq FROM binding ORDER BY seq")
        for room, key, subject, until, seq in rows:
            MemoryStore.bind(self, str(room), str(key), str(subject), float(until))
            self._seq = max(self._seq, int(seq))

    def _write(self, sql: str, args: tuple[object, ...]) -> None:
        if self._db is None or self._loading:
            return
        try:
            self._db.execute(sql, args)
        except sqlite3.Error as exc:
            self._write_errors += 1
            t = time.monotonic()
            if t - self._last_error_log >= WRITE_ERROR_LOG_INTERVAL_S:
                self._last_error_log = t
                log.warning(
                    "server store %s: write failed (%s; %d failed writes so far): the record "
                    "holds until this server stops",
                    self.path,
                    exc,
                    self._write_errors,
                )

    def revoke(self, room: str, subject: str, jti: str, until: float) -> None:
        super().revoke(room, subject, jti, until)
        self._write(
            "INSERT INTO revoked_jti (jti, until) VALUES (?, ?) "
            "ON CONFLICT (jti) DO UPDATE SET until = max(until, excluded.until)",
            (jti, until),
        )
        self._write(
            "INSERT INTO revoked_subject (room, subject, until) VALUES (?, ?, ?) "
            "ON CONFLICT (room, subject) DO UPDATE SET until = max(until, excluded.until)",
            (room, subject, until),
        )

    def close_room(self, room: str, at_ns: int) -> None:
        super().close_room(room, at_ns)
        self._write(
            "INSERT OR REPLACE INTO closed_room (room, closed_ns) VALUES (?, ?)", (room, at_ns)
        )
        if len(self._closed) >= MAX_CLOSED_ROOMS:
            oldest = next(iter(self._closed.values()))
            self._write("DELETE FROM closed_room WHERE closed_ns < ?", (oldest,))

    def reopen_room(self, room: str) -> None:
        super().reopen_room(room)
        self._write("DELETE FROM closed_room WHERE room = ?", (room,))

    def bind(self, room: str, key: str, subject: str, until: float) -> None:
        super().bind(room, key, subject, until)
        b = self._bindings.get((room, key))
        if b is not None:
            self._seq += 1
            self._write(
                "INSERT OR REPLACE INTO binding (room, key, subject, until, seq) "
                "VALUES (?, ?, ?, ?, ?)",
                (room, key, b[0], b[1], self._seq),
            )

    def _deleted(self, room: str, key: str) -> None:
        self._write("DELETE FROM binding WHERE room = ? AND key = ?", (room, key))

    def prune(self, now: float) -> None:
        super().prune(now)
        self._write("DELETE FROM revoked_jti WHERE until < ?", (now,))
        self._write("DELETE FROM revoked_subject WHERE until < ?", (now,))

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def default_data_dir() -> Path:
    """``$XDG_STATE_HOME/posewire``, else ``~/.local/state/posewire``."""
    state = os.environ.get("XDG_STATE_HOME")
    base = Path(state) if state and Path(state).is_absolute() else Path.home() / ".local" / "state"
    return base / "posewire"


def store_path(data_dir: Path, secret: str) -> Path:
    """The store file of the tokens of ``secret`` in ``data_dir``."""
    fp = hmac.new(secret.encode(), b"posewire server store", hashlib.sha256).hexdigest()[:16]
    return data_dir / f"server-{fp}.sqlite3"


def open_store(config: ServerConfig, secret: str, *, persistent: bool = True) -> RoomStore:
    """The server's store: SQLite in ``server.data_dir`` (see the module docstring), or
    memory when not ``persistent`` (a random per-process secret). A directory or file
    that cannot be used raises :class:`ConfigError` naming ``server.data_dir``."""
    if not persistent:
        return MemoryStore()
    data_dir = config.data_dir if config.data_dir is not None else default_data_dir()
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            [f"server.data_dir: cannot create {str(data_dir)!r}: {exc.strerror or exc}"]
        ) from exc
    return SqliteStore(store_path(data_dir, secret))
