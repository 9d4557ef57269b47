"""Where new capsules go: the `Placement` seam (`base.py`) and its implementations."""

from nestbox.controlplane.scheduling.base import Candidate, Demand, Placement
from nestbox.controlplane.scheduling.least_loaded import LeastLoaded

__all__ = ["Candidate", "Demand", "LeastLoaded", "Placement"]
