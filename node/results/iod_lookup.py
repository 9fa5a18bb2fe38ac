"""A cache in front of highdicom's "is this attribute in that IOD?" look-up.

highdicom asks it once per source image when it builds a SEG or an SR (is the image's IOD a multi-frame
one?), and each answer walks the standard's module tables: about 1-3 ms, so 0.3-0.9 s for a 300-slice
series. The answer depends only on the attribute, the SOP class and the excluded path elements, which the
pinned highdicom's tables never change while the process runs, so it is cached.
"""

from __future__ import annotations

import functools
import sys
from typing import Sequence

import highdicom  # noqa: F401 - imports the modules that hold the look-up by name
from highdicom import _standard_utils

_uncached = _standard_utils.is_attribute_in_iod


@functools.lru_cache(maxsize=4096)
def _lookup(attribute: str, sop_class_uid: str, exclude: tuple[str, ...] | None) -> bool:
    return _uncached(attribute, sop_class_uid, list(exclude) if exclude is not None else None)


def is_attribute_in_iod(attribute: str, sop_class_uid: str,
                        exclude_path_elements: Sequence[str] | None = None) -> bool:
    exclude = tuple(exclude_path_elements) if exclude_path_elements is not None else None
    return _lookup(str(attribute), str(sop_class_uid), exclude)


def install() -> None:
    """Route highdicom's look-ups through the cache: in its own module and in every highdicom module that
    imported the function by name."""
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "highdicom" and getattr(module, "is_attribute_in_iod", None) is _uncached:
            module.is_attribute_in_iod = is_attribute_in_iod  # type: ignore[attr-defined]


def preload() -> None:
    """Read the standard's tables that highdicom loads on first use (JSON, about 1 s), so that a warm worker's
    first job does not pay for it."""
    _standard_utils.get_sop_class_iod_map()
    _standard_utils.get_iod_module_map()
    _standard_utils.get_module_attribute_map()
