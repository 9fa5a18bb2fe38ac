from node.route.router import Router
from node.route.rules import Evaluation, SeriesFacts, StudyFacts, evaluate, evaluate_all

__all__ = ["Evaluation", "Router", "SeriesFacts", "StudyFacts", "evaluate", "evaluate_all"]
