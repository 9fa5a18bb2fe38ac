"""Housekeeping beside the pipeline: start-up reconciliation, retention, operator requests."""

from node.maintain.reconcile import ReconcileReport, reconcile
from node.maintain.requests import RequestHandler
from node.maintain.retention import Purger

__all__ = ["Purger", "ReconcileReport", "RequestHandler", "reconcile"]
