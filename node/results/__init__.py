from node.results.build import AlgorithmInfo, BuiltObject, build_results
from node.results.validate import validate_with_dciodvfy

__all__ = ["AlgorithmInfo", "BuiltObject", "build_results", "validate_with_dciodvfy"]
