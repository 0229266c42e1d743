"""Durable record of candidate runs and of which candidate users picked (SQLite)."""
from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY, request_id TEXT NOT NULL, model TEXT NOT NULL, ms REAL NOT NULL,
    candidate INTEGER NOT NULL, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS runs_by_request ON runs (request_id);
CREATE TABLE IF NOT EXISTS choices (
    request_id TEXT PRIMARY KEY, model TEXT NOT NULL, created REAL NOT NULL);
"""


class ChoiceStore:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a recorded pick survives a crash
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def record_run(self, request_id: str, model: str, ms: float, candidate: bool) -> None:
        with self._lock:
            self._db.execute("INSERT INTO runs (request_id, model, ms, candidate, created) VALUES (?, ?, ?, ?, ?)",
                             (request_id, model, ms, int(candidate), time.time()))

    def candidates(self, request_id: str) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT DISTINCT model FROM runs WHERE request_id = ? AND candidate = 1",
                                    (request_id,)).fetchall()
        return [model for (model,) in rows]

    def record_choice(self, request_id: str, model: str) -> None:
        """The latest pick for a request wins."""
        with self._lock:
            self._db.execute("INSERT INTO choices (request_id, model, created) VALUES (?, ?, ?) "
                             "ON CONFLICT(request_id) DO UPDATE SET model = excluded.model, created = excluded.created",
                             (request_id, model, time.time()))

    def stats(self) -> dict:
        with self._lock:
            runs = {m: (n, avg) for m, n, avg in self._db.execute(
                "SELECT model, COUNT(*), AVG(ms) FROM runs GROUP BY model")}
            offered = dict(self._db.execute("SELECT model, COUNT(*) FROM runs WHERE candidate = 1 GROUP BY model"))
            picks = dict(self._db.execute("SELECT model, COUNT(*) FROM choices GROUP BY model"))
            requests = self._db.execute(
                "SELECT COUNT(DISTINCT request_id) FROM runs WHERE candidate = 1").fetchone()[0]
        total_picks = sum(picks.values())
        models = []
        for model in sorted(set(runs) | set(picks)):
            count, mean_ms = runs.get(model, (0, 0.0))
            models.append({"model": model, "runs": count, "offered": offered.get(model, 0),
                           "picks": picks.get(model, 0),
                           "share": picks.get(model, 0) / total_picks if total_picks else 0.0,
                           "pick_rate": picks.get(model, 0) / offered[model] if offered.get(model) else 0.0,
                           "mean_ms": mean_ms or 0.0})
        return {"models": models, "choices": total_picks, "requests": requests}

    def close(self) -> None:
        self._db.close()
