"""De-identification of copies for external destinations (PS3.15 Basic Profile, keyed pseudonyms),
and re-identification of the results that come back from them."""

from node.deid.config import DeidKeyError, DeidSettings, SafePrivateTag, load_key
from node.deid.errors import BurnedInAnnotationError, DeidentificationError
from node.deid.profile import Deidentifier, applied_methods, check_burned_in
from node.deid.pseudonyms import Pair, PseudonymMap
from node.deid.reidentify import reidentify

__all__ = [
    "BurnedInAnnotationError", "DeidKeyError", "DeidSettings", "DeidentificationError", "Deidentifier", "Pair",
    "PseudonymMap", "SafePrivateTag", "applied_methods", "check_burned_in", "load_key", "reidentify",
]
