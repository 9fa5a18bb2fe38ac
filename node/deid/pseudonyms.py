"""The local map original ↔ pseudonym, durable in the node's store before a de-identified copy leaves.

Why the store and not a file of its own: the store is already the node's single source of truth, with
the durability the receiver relies on (SQLite WAL + synchronous=FULL, or PostgreSQL shared by several
nodes, so a result returning to any node of a site is recognised), it is backed up with the studies it
re-identifies, and it already holds the same identifiers (patient ID, accession number). The key is
not stored: re-identification needs only the map; pseudonymisation needs the key.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from sqlalchemy import create_engine, event, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from node.deid.models import Pseudonym

# kind → the attribute it restores in a returning object
KIND_KEYWORDS = {"patient_id": "PatientID", "patient_name": "PatientName", "accession": "AccessionNumber"}
ATTR = "attr:"
_CHUNK = 500  # bound parameters per IN (...) list, well under SQLite's limit
_KNOWN_MAX = 200_000  # pairs remembered as stored, to skip the read for the next instance of a series


@dataclass(frozen=True)
class Pair:
    kind: str  # uid | patient_id | patient_name | accession | attr:<Keyword>
    original: str
    pseudonym: str
    study_uid: str  # the ORIGINAL Study Instance UID this pair belongs to


def _chunks(values: list[str]) -> Iterator[list[str]]:
    for i in range(0, len(values), _CHUNK):
        yield values[i:i + _CHUNK]


class PseudonymMap:
    """Pairs of one node (or site), recorded once each; safe to share between threads."""

    def __init__(self, engine: Engine, *, write_lock: threading.Lock | None = None) -> None:
        """`engine`: the node store's (`Store.engine`). `write_lock`: the store's writer lock, if it has one."""
        Pseudonym.__table__.create(engine, checkfirst=True)
        self._session = sessionmaker(engine, expire_on_commit=False)
        self._lock = write_lock or threading.Lock()
        self._known: set[Pair] = set()  # committed already (by this process)

    @classmethod
    def open_sqlite(cls, path: Path) -> "PseudonymMap":
        """A map in a SQLite file of its own (tools, tests); the node passes its store's engine instead."""
        path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(f"sqlite:///{path}", connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.close()

        return cls(engine)

    # ---- write ---------------------------------------------------------

    def record(self, pairs: Iterable[Pair], key_id: str) -> int:
        """Commit the pairs not yet stored (one transaction; on disk when this returns). New rows count."""
        new = [p for p in dict.fromkeys(pairs) if p not in self._known]
        if not new:
            return 0
        for attempt in (1, 2):
            try:
                added = self._insert_missing(new, key_id)
                break
            except IntegrityError:  # another process stored some of them between our read and our write
                if attempt == 2:
                    raise
        if len(self._known) > _KNOWN_MAX:  # a cache, not a copy of the table: keep it bounded
            self._known.clear()
        self._known.update(new)
        return added

    def _insert_missing(self, pairs: list[Pair], key_id: str) -> int:
        studies = sorted({p.study_uid for p in pairs})
        with self._lock, self._session() as s, s.begin():
            have: set[Pair] = set()
            for chunk in _chunks(sorted({p.pseudonym for p in pairs})):
                have.update(Pair(*row) for row in s.execute(
                    select(Pseudonym.kind, Pseudonym.original, Pseudonym.pseudonym, Pseudonym.study_uid)
                    .where(Pseudonym.pseudonym.in_(chunk), Pseudonym.study_uid.in_(studies))))
            missing = [p for p in pairs if p not in have]
            now = time.time()
            s.add_all(Pseudonym(kind=p.kind, original=p.original, pseudonym=p.pseudonym, study_uid=p.study_uid,
                                key_id=key_id, created_at=now) for p in missing)
        return len(missing)

    # ---- read ----------------------------------------------------------

    def originals(self, kind: str, pseudonyms: Iterable[str]) -> dict[str, str]:
        """pseudonym → original for those of `kind` that are in the map."""
        wanted = sorted(set(pseudonyms))
        out: dict[str, str] = {}
        with self._session() as s:
            for chunk in _chunks(wanted):
                out.update(s.execute(select(Pseudonym.pseudonym, Pseudonym.original)
                                     .where(Pseudonym.kind == kind, Pseudonym.pseudonym.in_(chunk))).all())
        return out

    def original_study(self, study_uid: str) -> str | None:
        """The original Study Instance UID of a de-identified study's (pseudonymous) UID, or None: not ours."""
        with self._session() as s:
            row = s.execute(select(Pseudonym.original).where(
                Pseudonym.kind == "uid", Pseudonym.pseudonym == study_uid,
                Pseudonym.original == Pseudonym.study_uid).limit(1)).first()
        return None if row is None else row[0]

    def study_context(self, original_study_uid: str) -> dict[str, str]:
        """Keyword → original value of the patient and study attributes recorded for that study."""
        out: dict[str, str] = {}
        with self._session() as s:
            rows = s.execute(select(Pseudonym.kind, Pseudonym.original)
                             .where(Pseudonym.study_uid == original_study_uid, Pseudonym.kind != "uid")
                             .order_by(Pseudonym.id)).all()
        for kind, original in rows:
            keyword = KIND_KEYWORDS.get(kind) or (kind[len(ATTR):] if kind.startswith(ATTR) else None)
            if keyword:
                out[keyword] = original
        return out
