"""PS3.15 Table E.1-1 (Basic Application Level Confidentiality Profile): the action per attribute.

The table itself is not typed in here: it comes from the `dicom-anonymizer` package (KitwareMedical),
whose `dicomfields_2026c` module is generated from the DICOM 2026c edition of PS3.15 Annex E. Only its
action lists are used; applying them (recursively, keyed, with the options) is node.deid.profile's job.

The option columns of Table E.1-1 that the node offers are applied on top, in profile.py:
Retain UIDs (U attributes kept), Retain Longitudinal Temporal Information (Full Dates: dates kept;
Modified Dates: dates shifted), Retain Patient Characteristics (PATIENT_CHARACTERISTICS kept).
"""

from __future__ import annotations

import enum
import importlib
from functools import lru_cache

from pydicom.tag import BaseTag, Tag

EDITION = "dicomfields_2026c"


class Action(enum.Enum):
    """Table E.1-1 action codes."""

    D = "D"  # replace with a non-zero length dummy consistent with the VR
    Z = "Z"  # zero length (or a dummy)
    X = "X"  # remove
    U = "U"  # replace UID, consistently within the set of instances
    Z_D = "Z/D"
    X_Z = "X/Z"
    X_D = "X/D"
    X_Z_D = "X/Z/D"
    X_Z_U = "X/Z/U*"  # sequences holding UID references: keep, clean the items


_CATEGORIES = {
    "D_TAGS": Action.D, "Z_TAGS": Action.Z, "X_TAGS": Action.X, "U_TAGS": Action.U,
    "Z_D_TAGS": Action.Z_D, "X_Z_TAGS": Action.X_Z, "X_D_TAGS": Action.X_D, "X_Z_D_TAGS": Action.X_Z_D,
    "X_Z_U_STAR_TAGS": Action.X_Z_U,
}

# Retain Patient Characteristics Option (Table E.1-1 column "Rtn. Pat. Chars. Opt." = K).
PATIENT_CHARACTERISTICS = frozenset(Tag(t) for t in (
    "PatientSex", "PatientAge", "PatientSize", "PatientWeight", "PatientSexNeutered", "EthnicGroup",
    "SmokingStatus", "PregnancyStatus", "PatientSpeciesDescription", "PatientBreedDescription",
))


@lru_cache(maxsize=1)
def _load() -> tuple[dict[BaseTag, Action], tuple[tuple[int, int, int, int, Action], ...]]:
    try:
        fields = importlib.import_module(f"dicomanonymizer.dicom_anonymization_databases.{EDITION}")
    except ImportError as exc:  # pragma: no cover - a broken install
        raise RuntimeError(f"the PS3.15 action table ({EDITION}) cannot be imported: "
                           f"pip install 'dicom-anonymizer>=2.1,<3' ({exc})") from exc
    exact: dict[BaseTag, Action] = {}
    masked: list[tuple[int, int, int, int, Action]] = []
    for category, action in _CATEGORIES.items():
        for entry in getattr(fields, category):
            if len(entry) == 2:
                exact[Tag(entry[0], entry[1])] = action
            else:  # repeating groups (50xx, 60xx): (group, element, group mask, element mask)
                masked.append((entry[0], entry[1], entry[2], entry[3], action))
    return exact, tuple(masked)


def action_for(tag: BaseTag) -> Action | None:
    """The table's action for `tag`, or None if the table does not list it (the attribute is kept)."""
    exact, masked = _load()
    found = exact.get(tag)
    if found is not None:
        return found
    for group, element, gmask, emask, action in masked:
        if tag.group & gmask == group & gmask and tag.element & emask == element & emask:
            return action
    return None


def uid_tags() -> frozenset[BaseTag]:
    """Attributes whose action is U: the instance UIDs that Retain UIDs keeps and otherwise get keyed ones."""
    exact, _ = _load()
    return frozenset(t for t, a in exact.items() if a is Action.U)
