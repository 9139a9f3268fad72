"""galvatron_fx: automatic hybrid parallelism for unmodified PyTorch Transformers.

``capture`` turns a model into an annotated ``Program``; later steps profile it, search a plan and
lower it into per-rank programs (see README.md for the architecture).
"""

from .capture import capture
from .cluster import Cluster
from .errors import CaptureError, ConfigError, GalvatronError, PlanError, ProfileError
from .program import Layer, LayerStats, Program, TensorSpec

__version__ = "0.1.0"

__all__ = [
    "capture", "Cluster", "Program", "Layer", "LayerStats", "TensorSpec",
    "GalvatronError", "CaptureError", "ConfigError", "PlanError", "ProfileError",
]
