"""Durable record of candidate runs and of which candidate users picked: SQLite
(one replica, a file) or PostgreSQL (DATABASE_URL: every replica records into
and reads from the same database), through one code path (SQLAlchemy Core)."""

from __future__ import annotations

import functools
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from services.common.errors import Unavailable

logger = logging.getLogger("imagemesh.bgremoval.store")

METADATA = sa.MetaData()
RUNS = sa.Table(
    "runs",
    METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.String, nullable=False),
    sa.Column("model", sa.String, nullable=False),
    sa.Column("ms", sa.Float, nullable=False),
    sa.Column("candidate", sa.Integer, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.Index("runs_by_request", "request_id"),
)
CHOICES = sa.Table(
    "choices",
    METADATA,
    sa.Column("request_id", sa.String, primary_key=True),
    sa.Column("model", sa.String, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
)
UPSERTS: dict[str, Callable[[sa.Table], sqlite.Insert | postgresql.Insert]] = {
    "sqlite": sqlite.insert,
    "postgresql": postgresql.insert,
}


def database_url(url: str, sqlite_path: Path) -> str:
    """DATABASE_URL as SQLAlchemy takes it (postgresql:// through psycopg 3), else the SQLite file."""
    if not url:
        return f"sqlite:///{sqlite_path}"
    parsed = make_url(url)
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in UPSERTS:
        raise ValueError(f"DATABASE_URL: {parsed.get_backend_name()} is not supported (postgresql or sqlite)")
    return parsed.render_as_string(hide_password=False)


def _unavailable(method):
    """The database unreachable or failing: UNAVAILABLE, with what it said."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except SQLAlchemyError as exc:
            raise Unavailable(f"the picks database failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None

    return wrapper


class ChoiceStore:
    """Blocking calls (run them off the event loop); `record_run_later` queues a write."""

    def __init__(self, url: str):
        backend = make_url(url).get_backend_name()
        if backend == "sqlite":
            Path(make_url(url).database or ":memory:").parent.mkdir(parents=True, exist_ok=True)
        self.engine = sa.create_engine(url, pool_pre_ping=True)
        if backend == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_durability)
        self._upsert = UPSERTS[backend]
        METADATA.create_all(self.engine)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="choices")

    @_unavailable
    def record_run(self, request_id: str, model: str, ms: float, candidate: bool) -> None:
        with self.engine.begin() as db:
            db.execute(
                RUNS.insert().values(
                    request_id=request_id, model=model, ms=ms, candidate=int(candidate), created=time.time()
                )
            )

    def record_run_later(self, request_id: str, model: str, ms: float) -> None:
        """A single run's statistics, written in order off the caller's thread (nothing waits for it)."""
        self._writer.submit(self.record_run, request_id, model, ms, False).add_done_callback(_log_failure)

    @_unavailable
    def candidates(self, request_id: str) -> list[str]:
        with self.engine.connect() as db:
            rows = db.execute(
                sa.select(RUNS.c.model).distinct().where(RUNS.c.request_id == request_id, RUNS.c.candidate == 1)
            )
            return sorted(model for (model,) in rows)

    @_unavailable
    def record_choice(self, request_id: str, model: str) -> None:
        """The latest pick for a request wins."""
        statement = self._upsert(CHOICES).values(request_id=request_id, model=model, created=time.time())
        with self.engine.begin() as db:
            db.execute(
                statement.on_conflict_do_update(
                    index_elements=[CHOICES.c.request_id],
                    set_={"model": statement.excluded.model, "created": statement.excluded.created},
                )
            )

    @_unavailable
    def stats(self) -> dict:
        with self.engine.connect() as db:
            runs = {
                m: (n, avg)
                for m, n, avg in db.execute(
                    sa.select(RUNS.c.model, sa.func.count(), sa.func.avg(RUNS.c.ms)).group_by(RUNS.c.model)
                )
            }
            offered: dict[str, int] = dict(
                db.execute(
                    sa.select(RUNS.c.model, sa.func.count()).where(RUNS.c.candidate == 1).group_by(RUNS.c.model)
                ).all()
            )
            picks: dict[str, int] = dict(
                db.execute(sa.select(CHOICES.c.model, sa.func.count()).group_by(CHOICES.c.model)).all()
            )
            requests = db.execute(
                sa.select(sa.func.count(sa.distinct(RUNS.c.request_id))).where(RUNS.c.candidate == 1)
            ).scalar_one()
        total_picks = sum(picks.values())
        models = []
        for model in sorted(set(runs) | set(picks)):
            count, mean_ms = runs.get(model, (0, 0.0))
            models.append(
                {
                    "model": model,
                    "runs": count,
                    "offered": offered.get(model, 0),
                    "picks": picks.get(model, 0),
                    "share": picks.get(model, 0) / total_picks if total_picks else 0.0,
                    "pick_rate": picks.get(model, 0) / offered[model] if offered.get(model) else 0.0,
                    "mean_ms": float(mean_ms or 0.0),
                }
            )
        return {"models": models, "choices": total_picks, "requests": requests}

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self.engine.dispose()


def _sqlite_durability(connection, _record) -> None:
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")  # a recorded pick survives a crash


def _log_failure(future: Future) -> None:
    if future.exception() is not None:
        logger.warning("a run's statistics were not recorded: %s", future.exception())
