from node.store.db import DispatchItem, InstanceMeta, NewJob, Store
from node.store.models import DispatchState, JobState, StudyState

__all__ = ["DispatchItem", "DispatchState", "InstanceMeta", "JobState", "NewJob", "Store", "StudyState"]
