"""The conversation store shared by replicas: the source of truth for server-held conversations.

A replica's KV cache is only an accelerator. What a conversation *is* - its messages, from which the
chat template re-derives the exact token history - lives here, so a turn that lands on another
replica, or arrives after a replica died, rebuilds its state and loses nothing.

    sqlite:///PATH       default; one file shared by every replica on one machine (WAL, busy timeout)
    redis://HOST:PORT/DB every replica on every node (serving/store_redis.py)
    memory://            this process only (tests, single-replica development)

Every conversation belongs to an owner (the API key's tenant name, serving/auth.py) and is keyed by
(owner, id): another owner never sees it, and two owners may use the same id.

Writes are optimistic: `append(owner, sid, expected_turns, messages)` fails with StoreConflict when
another request extended the conversation first, so two concurrent turns cannot overwrite each other.

Limits (serving/README.md, "Limits"): a conversation idle for `ttl_s` expires; when an owner has
more than `max_conversations`, the least recently used ones are evicted as a new one is created.

Each write carries `stats` = {"usage": <the turn's OpenAI usage, serving/protocol.py usage()>,
"finish_reason"}. A row keeps the last turn's stats (its `tokens` count) and `usage`: one entry per
assistant message, in order - the chat page redraws every turn's memory bar from it after a reload.
The list grows with the messages and is bounded with them (max_conversation_tokens, ttl_s,
max_conversations). A turn whose usage is unknown is None: the turns of a conversation stored
before usage was kept, the earlier turns of a client-held history the store had not seen as it is.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("ctxmem.serving.store")

TITLE_CHARS = 80


class StoreConflict(Exception):
    """The conversation changed since it was read (a concurrent turn)."""


class StoreUnavailable(Exception):
    """The store could not be read or written (disk, network, permissions)."""


class ConversationStore(Protocol):
    """Rows are {"id", "messages", "usage", "turns", "created", "updated", "title", "tokens", "stats"};
    `list` leaves out messages and usage."""

    def create(self, owner: str, sid: str, max_conversations: int | None = None) -> dict[str, Any]: ...
    def get(self, owner: str, sid: str) -> dict[str, Any] | None: ...
    def list(self, owner: str) -> list[dict[str, Any]]: ...  # rows without messages, most recent first
    def append(self, owner: str, sid: str, expected_turns: int, messages: list[dict], stats: dict | None = None,
               max_conversations: int | None = None) -> int: ...
    def put(self, owner: str, sid: str, messages: list[dict], stats: dict | None = None,
            max_conversations: int | None = None) -> None: ...
    def delete(self, owner: str, sid: str) -> bool: ...


def title(messages: list[dict]) -> str:
    """The first user message, on one line, truncated."""
    first = next((m["content"] for m in messages if m.get("role") == "user"), "")
    text = " ".join(first.split())
    return text if len(text) <= TITLE_CHARS else text[:TITLE_CHARS - 1] + "…"


def stored_tokens(stats: dict | None) -> int:
    """Tokens the conversation holds after its last turn: that turn's prompt (the whole rendered
    history) plus its completion."""
    usage = (stats or {}).get("usage") or {}
    return int(usage.get("prompt_tokens", 0)) + int(usage.get("completion_tokens", 0))


def turns_of(messages: list[dict]) -> int:
    return sum(1 for m in messages if m.get("role") == "assistant")


def padded(usage: list | None, turns: int) -> list[dict | None]:
    """Exactly one usage entry per turn. A conversation stored before usage was kept (None), or
    continued after that, lacks its earliest turns' entries: they are None."""
    usage = list(usage or [])[-turns:] if turns > 0 else []
    return [None] * (turns - len(usage)) + usage


def appended_usage(old: list | None, old_turns: int, stats: dict | None) -> list[dict | None]:
    """The usage list after `append` added one turn described by `stats`."""
    return padded(old, old_turns) + [(stats or {}).get("usage")]


def put_usage(old_messages: list[dict] | None, old: list | None, messages: list[dict],
              stats: dict | None) -> list[dict | None]:
    """The usage list after `put` replaced the messages (a client-held history). The stored turns'
    usage is kept only while the new history starts with the stored one; `stats` describes the last
    message when it is the assistant's answer; any other turn is None."""
    turns = turns_of(messages)
    kept: list = []
    if old_messages and messages[:len(old_messages)] == old_messages:
        kept = padded(old, turns_of(old_messages))
    usage = (kept + [None] * turns)[:turns]
    if usage and messages[-1].get("role") == "assistant" and (stats or {}).get("usage") is not None:
        usage[-1] = stats["usage"]
    return usage


class SQLiteStore:
    """Messages as one JSON row per conversation. Safe across processes on one machine."""

    def __init__(self, path: str | Path, ttl_s: float | None = None):
        self.path = Path(path).expanduser()
        self.ttl_s = ttl_s
        self._local = threading.local()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # (`conversations` was the table before conversations had owners; it is left alone)
            self._db().execute(
                "CREATE TABLE IF NOT EXISTS owned_conversations (owner TEXT NOT NULL, sid TEXT NOT NULL, "
                "messages TEXT NOT NULL, turns INTEGER NOT NULL, stats TEXT, created REAL NOT NULL, "
                "updated REAL NOT NULL, title TEXT NOT NULL, tokens INTEGER NOT NULL, turn_usage TEXT, "
                "PRIMARY KEY (owner, sid))")
            self._db().execute("CREATE INDEX IF NOT EXISTS owned_conversations_updated "
                               "ON owned_conversations (owner, updated)")
            self._add_turn_usage()
            self._warn_about_ownerless()
        except (OSError, sqlite3.Error) as err:
            raise StoreUnavailable(f"cannot open the conversation store {self.path}: {err}") from None

    def _warn_about_ownerless(self) -> None:
        """A file from before conversations had owners keeps them in `conversations`, untouched: they
        belonged to no key, so serving them to any key would leak them. Say so once at start-up rather
        than let them vanish silently."""
        if self._db().execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='conversations'").fetchone():
            count = self._db().execute("SELECT COUNT(*) FROM conversations").fetchone()[0]
            if count:
                log.warning("%s holds %d conversation(s) stored before conversations had owners (table "
                            "`conversations`); they are kept but not served to any key. To hand them to a key, "
                            "copy their rows into `owned_conversations` with that key's tenant name as `owner`.",
                            self.path, count)

    def _add_turn_usage(self) -> None:
        """A file written before each turn's usage was kept gains the column; its rows read NULL there
        (every turn None). Two processes opening it at once may race: the loser's 'duplicate column'
        means the column is there."""
        columns = [r[1] for r in self._db().execute("PRAGMA table_info(owned_conversations)")]
        if "turn_usage" not in columns:
            try:
                self._db().execute("ALTER TABLE owned_conversations ADD COLUMN turn_usage TEXT")
            except sqlite3.OperationalError as err:
                if "duplicate column" not in str(err):
                    raise

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    def _run(self, fn, *args):
        try:
            return fn(self._db(), *args)
        except sqlite3.Error as err:
            raise StoreUnavailable(f"conversation store {self.path}: {err}") from None

    def _alive(self) -> float:
        return time.time() - self.ttl_s if self.ttl_s else float("-inf")

    _COLS = "sid, messages, turns, stats, created, updated, title, tokens, turn_usage"

    @staticmethod
    def _row(r, messages: bool = True) -> dict[str, Any]:
        row = {"id": r[0], "turns": r[2], "stats": json.loads(r[3] or "{}"), "created": r[4], "updated": r[5],
               "title": r[6], "tokens": r[7]}
        if messages:
            row["messages"] = json.loads(r[1])
            row["usage"] = padded(json.loads(r[8] or "null"), r[2])
        return row

    def get(self, owner: str, sid: str) -> dict[str, Any] | None:
        def go(db):
            r = db.execute(f"SELECT {self._COLS} FROM owned_conversations WHERE owner = ? AND sid = ? "
                           "AND updated >= ?", (owner, sid, self._alive())).fetchone()
            return None if r is None else self._row(r)
        return self._run(go)

    def list(self, owner: str) -> list[dict[str, Any]]:
        def go(db):
            rows = db.execute(f"SELECT {self._COLS} FROM owned_conversations WHERE owner = ? AND updated >= ? "
                              "ORDER BY updated DESC", (owner, self._alive())).fetchall()
            return [self._row(r, messages=False) for r in rows]
        return self._run(go)

    def _write(self, db, owner, sid, messages, usage, turns, stats, created, max_conversations):
        now = time.time()
        db.execute("INSERT OR REPLACE INTO owned_conversations (owner, sid, messages, turns, stats, created, "
                   "updated, title, tokens, turn_usage) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (owner, sid, json.dumps(messages, ensure_ascii=False), turns, json.dumps(stats or {}),
                    created or now, now, title(messages), stored_tokens(stats), json.dumps(usage)))
        if created is None:  # a new conversation: expire idle ones, evict this owner's least recently used
            db.execute("DELETE FROM owned_conversations WHERE updated < ?", (self._alive(),))
            if max_conversations:
                db.execute("DELETE FROM owned_conversations WHERE owner = ? AND sid NOT IN (SELECT sid FROM "
                           "owned_conversations WHERE owner = ? ORDER BY updated DESC LIMIT ?)",
                           (owner, owner, max_conversations))

    def _existing(self, db, owner, sid):
        return db.execute("SELECT messages, turns, created, turn_usage FROM owned_conversations "
                          "WHERE owner = ? AND sid = ? "
                          "AND updated >= ?", (owner, sid, self._alive())).fetchone()

    def create(self, owner: str, sid: str, max_conversations: int | None = None) -> dict[str, Any]:
        def go(db):
            db.execute("BEGIN IMMEDIATE")
            try:
                if self._existing(db, owner, sid) is not None:
                    raise StoreConflict(f"conversation {sid!r} exists")
                self._write(db, owner, sid, [], [], 0, {}, None, max_conversations)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        self._run(go)
        return self.get(owner, sid)

    def append(self, owner: str, sid: str, expected_turns: int, messages: list[dict], stats: dict | None = None,
               max_conversations: int | None = None) -> int:
        """Add messages to the conversation if it still has `expected_turns` turns; returns the new count."""
        def go(db):
            db.execute("BEGIN IMMEDIATE")
            try:
                row = self._existing(db, owner, sid)
                turns = row[1] if row else 0
                if turns != expected_turns:
                    raise StoreConflict(f"conversation {sid!r} has {turns} turns, expected {expected_turns}")
                history = (json.loads(row[0]) if row else []) + list(messages)
                usage = appended_usage(json.loads(row[3] or "null") if row else None, turns, stats)
                self._write(db, owner, sid, history, usage, turns + 1, stats, row[2] if row else None,
                            max_conversations)
                db.execute("COMMIT")
                return turns + 1
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return self._run(go)

    def put(self, owner: str, sid: str, messages: list[dict], stats: dict | None = None,
            max_conversations: int | None = None) -> None:
        """Record a client-held conversation as it now stands (stateless endpoints with a session id)."""
        def go(db):
            db.execute("BEGIN IMMEDIATE")
            try:
                row = self._existing(db, owner, sid)
                usage = put_usage(json.loads(row[0]) if row else None, json.loads(row[3] or "null") if row else None,
                                  messages, stats)
                self._write(db, owner, sid, list(messages), usage, turns_of(messages), stats,
                            row[2] if row else None, max_conversations)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        self._run(go)

    def delete(self, owner: str, sid: str) -> bool:
        return self._run(lambda db: db.execute("DELETE FROM owned_conversations WHERE owner = ? AND sid = ?",
                                               (owner, sid)).rowcount > 0)


class MemoryStore:
    """A dict; visible to this process only."""

    def __init__(self, ttl_s: float | None = None) -> None:
        self.ttl_s = ttl_s
        self._data: dict[tuple[str, str], dict[str, Any]] = {}
        self._lock = threading.Lock()

    def _live(self, key) -> dict[str, Any] | None:
        row = self._data.get(key)
        if row is not None and self.ttl_s and row["updated"] < time.time() - self.ttl_s:
            del self._data[key]
            return None
        return row

    def get(self, owner: str, sid: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._live((owner, sid))
            return {**json.loads(json.dumps(row)), "usage": padded(row.get("usage"), row["turns"])} if row else None

    def list(self, owner: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = [self._live(k) for k in list(self._data) if k[0] == owner]
            rows = [{k: v for k, v in r.items() if k not in ("messages", "usage")} for r in rows if r is not None]
            return sorted(rows, key=lambda r: r["updated"], reverse=True)

    def _write(self, owner, sid, messages, usage, turns, stats, max_conversations) -> None:
        now = time.time()
        old = self._live((owner, sid))
        self._data[(owner, sid)] = {"id": sid, "messages": list(messages), "usage": usage, "turns": turns,
                                    "stats": stats or {},
                                    "created": old["created"] if old else now, "updated": now,
                                    "title": title(messages), "tokens": stored_tokens(stats)}
        if old is None and max_conversations:
            mine = sorted((k for k in self._data if k[0] == owner), key=lambda k: self._data[k]["updated"])
            for k in mine[:max(0, len(mine) - max_conversations)]:
                del self._data[k]

    def create(self, owner: str, sid: str, max_conversations: int | None = None) -> dict[str, Any]:
        with self._lock:
            if self._live((owner, sid)) is not None:
                raise StoreConflict(f"conversation {sid!r} exists")
            self._write(owner, sid, [], [], 0, {}, max_conversations)
        return self.get(owner, sid)

    def append(self, owner: str, sid: str, expected_turns: int, messages: list[dict], stats: dict | None = None,
               max_conversations: int | None = None) -> int:
        with self._lock:
            row = self._live((owner, sid)) or {"messages": [], "turns": 0}
            if row["turns"] != expected_turns:
                raise StoreConflict(f"conversation {sid!r} has {row['turns']} turns, expected {expected_turns}")
            self._write(owner, sid, row["messages"] + list(messages),
                        appended_usage(row.get("usage"), row["turns"], stats), row["turns"] + 1, stats,
                        max_conversations)
            return row["turns"] + 1

    def put(self, owner: str, sid: str, messages: list[dict], stats: dict | None = None,
            max_conversations: int | None = None) -> None:
        with self._lock:
            old = self._live((owner, sid)) or {}
            self._write(owner, sid, messages, put_usage(old.get("messages"), old.get("usage"), messages, stats),
                        turns_of(messages), stats, max_conversations)

    def delete(self, owner: str, sid: str) -> bool:
        with self._lock:
            return self._data.pop((owner, sid), None) is not None


def open_store(url: str, ttl_s: float | None = None) -> ConversationStore:
    if url.startswith("sqlite:///"):
        return SQLiteStore(url[len("sqlite:///"):], ttl_s)  # sqlite:///rel/path, sqlite:////abs/path, sqlite:///~/path
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .store_redis import RedisStore

        return RedisStore(url, ttl_s)
    if url == "memory://":
        return MemoryStore(ttl_s)
    raise ValueError(f"unknown session store {url!r}; use sqlite:///PATH, redis://HOST:PORT/DB or memory://")
