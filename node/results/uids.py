"""Output UIDs derived from the inputs, so a re-run replaces its earlier objects instead of adding copies."""

from __future__ import annotations

import uuid

# Fixed namespace of this project's name-based UUIDs (itself uuid5 of the DNS namespace and "ainode").
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, "ainode.dicom-ai-node")


def derive_uid(*parts: str) -> str:
    """A 2.25 UID (ISO/IEC 9834-8) from a name-based UUID of `parts`: same parts, same UID, on any node.

    pydicom's generate_uid(prefix=None) ignores its entropy sources and is random, so it cannot be used.
    """
    return f"2.25.{uuid.uuid5(NAMESPACE, chr(31).join(map(str, parts))).int}"
