from node.route.router import Router
from node.route.rules import SeriesFacts, StudyFacts, evaluate

__all__ = ["Router", "SeriesFacts", "StudyFacts", "evaluate"]
