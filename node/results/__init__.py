from node.results import iod_lookup
from node.results.build import AlgorithmInfo, BuiltObject, build_results
from node.results.validate import validate_with_dciodvfy

iod_lookup.install()  # highdicom's per-image IOD look-up, cached (iod_lookup.py says why)

__all__ = ["AlgorithmInfo", "BuiltObject", "build_results", "validate_with_dciodvfy"]
