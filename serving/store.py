"""The conversation store shared by replicas: the source of truth for server-held conversations.

A replica's KV cache is only an accelerator. What a conversation *is* - its messages, from which the
chat template re-derives the exact token history - lives here, so a turn that lands on another
replica, or arrives after a replica died, rebuilds its state and loses nothing.

    sqlite:///PATH   default; one file shared by every replica on one machine (WAL, busy timeout)
    actor://NAME     a detached Ray actor holding a SQLite file on its node: works across nodes
                     (one writer, every replica reaches it through Ray)
    memory://        this process only (tests, single-replica development)

Writes are optimistic: `append(sid, expected_turns, messages)` fails with StoreConflict when another
request extended the conversation first, so two concurrent turns cannot silently overwrite each other.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Protocol


class StoreConflict(Exception):
    """The conversation changed since it was read (a concurrent turn)."""


class ConversationStore(Protocol):
    def get(self, sid: str) -> dict[str, Any] | None: ...  # {"messages", "turns", "updated"}
    def append(self, sid: str, expected_turns: int, messages: list[dict], stats: dict | None = None) -> int: ...
    def put(self, sid: str, messages: list[dict], stats: dict | None = None) -> None: ...
    def delete(self, sid: str) -> bool: ...


class SQLiteStore:
    """Messages as one JSON row per conversation. Safe across processes on one machine."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._db() as db:
            db.execute("CREATE TABLE IF NOT EXISTS conversations (sid TEXT PRIMARY KEY, messages TEXT NOT NULL, "
                       "turns INTEGER NOT NULL, stats TEXT, updated REAL NOT NULL)")

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    def get(self, sid: str) -> dict[str, Any] | None:
        row = self._db().execute("SELECT messages, turns, stats, updated FROM conversations WHERE sid = ?",
                                 (sid,)).fetchone()
        if row is None:
            return None
        return {"messages": json.loads(row[0]), "turns": row[1], "stats": json.loads(row[2] or "{}"),
                "updated": row[3]}

    def append(self, sid: str, expected_turns: int, messages: list[dict], stats: dict | None = None) -> int:
        """Add messages to the conversation if it still has `expected_turns` turns; returns the new count."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT messages, turns FROM conversations WHERE sid = ?", (sid,)).fetchone()
            turns = row[1] if row else 0
            if turns != expected_turns:
                raise StoreConflict(f"conversation {sid!r} has {turns} turns, expected {expected_turns}")
            history = (json.loads(row[0]) if row else []) + list(messages)
            db.execute("INSERT OR REPLACE INTO conversations VALUES (?, ?, ?, ?, ?)",
                       (sid, json.dumps(history, ensure_ascii=False), turns + 1, json.dumps(stats or {}), time.time()))
            db.execute("COMMIT")
            return turns + 1
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def put(self, sid: str, messages: list[dict], stats: dict | None = None) -> None:
        """Record a client-held conversation as it now stands (stateless endpoints with a session id)."""
        turns = sum(1 for m in messages if m.get("role") == "assistant")
        self._db().execute("INSERT OR REPLACE INTO conversations VALUES (?, ?, ?, ?, ?)",
                           (sid, json.dumps(messages, ensure_ascii=False), turns, json.dumps(stats or {}), time.time()))

    def delete(self, sid: str) -> bool:
        return self._db().execute("DELETE FROM conversations WHERE sid = ?", (sid,)).rowcount > 0


class MemoryStore:
    """A dict; visible to this process only."""

    def __init__(self) -> None:
        self._data: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def get(self, sid: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._data.get(sid)
            return json.loads(json.dumps(row)) if row else None

    def append(self, sid: str, expected_turns: int, messages: list[dict], stats: dict | None = None) -> int:
        with self._lock:
            row = self._data.get(sid) or {"messages": [], "turns": 0}
            if row["turns"] != expected_turns:
                raise StoreConflict(f"conversation {sid!r} has {row['turns']} turns, expected {expected_turns}")
            self._data[sid] = {"messages": row["messages"] + list(messages), "turns": row["turns"] + 1,
                               "stats": stats or {}, "updated": time.time()}
            return row["turns"] + 1

    def put(self, sid: str, messages: list[dict], stats: dict | None = None) -> None:
        with self._lock:
            turns = sum(1 for m in messages if m.get("role") == "assistant")
            self._data[sid] = {"messages": list(messages), "turns": turns, "stats": stats or {}, "updated": time.time()}

    def delete(self, sid: str) -> bool:
        with self._lock:
            return self._data.pop(sid, None) is not None


class ActorStore:
    """Client of a detached, named Ray actor that owns a SQLiteStore on its node (multi-node clusters)."""

    def __init__(self, name: str, path: str | None = None):
        import ray

        actor_cls = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(_StoreActor)
        self._actor = actor_cls.options(name=name, namespace="ctxmem", lifetime="detached",
                                        get_if_exists=True).remote(path or f"~/.cache/ctxmem/{name}.sqlite")
        self._ray = ray

    def _call(self, method: str, *args):
        result = self._ray.get(getattr(self._actor, method).remote(*args))
        if isinstance(result, dict) and result.get("__conflict__"):
            raise StoreConflict(result["message"])
        return result

    def get(self, sid):
        return self._call("get", sid)

    def append(self, sid, expected_turns, messages, stats=None):
        return self._call("append", sid, expected_turns, messages, stats)

    def put(self, sid, messages, stats=None):
        return self._call("put", sid, messages, stats)

    def delete(self, sid):
        return self._call("delete", sid)


class _StoreActor:
    def __init__(self, path: str):
        self.store = SQLiteStore(path)

    def get(self, sid):
        return self.store.get(sid)

    def append(self, sid, expected_turns, messages, stats=None):
        try:
            return self.store.append(sid, expected_turns, messages, stats)
        except StoreConflict as err:  # typed errors do not survive the actor boundary cleanly
            return {"__conflict__": True, "message": str(err)}

    def put(self, sid, messages, stats=None):
        return self.store.put(sid, messages, stats)

    def delete(self, sid):
        return self.store.delete(sid)


def open_store(url: str) -> ConversationStore:
    if url.startswith("sqlite:///"):
        return SQLiteStore(url[len("sqlite:///"):])  # sqlite:///rel/path, sqlite:////abs/path, sqlite:///~/path
    if url.startswith("actor://"):
        name, _, path = url[len("actor://"):].partition("?path=")
        return ActorStore(name or "ctxmem-sessions", path or None)
    if url == "memory://":
        return MemoryStore()
    raise ValueError(f"unknown session store {url!r}; use sqlite:///PATH, actor://NAME or memory://")
