"""The pseudonym table, in the node's store (same file or PostgreSQL database as studies and jobs).

It is declared here, on the store's declarative Base, so node.deid owns its one table;
PseudonymMap creates it in an existing store (create_all adds new tables, never touches old ones).
"""

from __future__ import annotations

from sqlalchemy import Float, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from node.store.models import Base


class Pseudonym(Base):
    """An original value and its pseudonym in a copy de-identified for an external destination.

    `study_uid` is the original Study Instance UID the pair was recorded for, so a result returning from
    the external service can be put back into that study with its patient and study attributes restored.
    Kinds: uid, patient_id, patient_name, accession, and attr:<Keyword> for the other study attributes.
    """

    __tablename__ = "pseudonyms"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(48))
    original: Mapped[str] = mapped_column(String(256))
    pseudonym: Mapped[str] = mapped_column(String(256))
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    key_id: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[float] = mapped_column(Float)

    __table_args__ = (
        Index("uq_pseudonym_pair", "kind", "study_uid", "original", "pseudonym", unique=True),
        Index("ix_pseudonym_lookup", "kind", "pseudonym"),
    )
