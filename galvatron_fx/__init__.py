"""galvatron_fx: automatic hybrid parallelism for unmodified PyTorch Transformers.

``compile(model, cluster, example_kwargs=batch)`` captures the model, searches (or takes) a plan and lowers
it for this rank; ``capture`` alone turns a model into an annotated ``Program`` (see README.md).
"""

from .capture import capture
from .cluster import Cluster
from .compile import compile
from .compiled_model import CompiledModel
from .errors import CaptureError, ConfigError, GalvatronError, PlanError, ProfileError
from .plan import EmbeddingStrategy, LayerStrategy, Plan
from .plan_sources import uniform_plan
from .program import Layer, LayerStats, Program, TensorSpec
from .runtime.materialize import empty_parameters

__version__ = "0.1.0"

__all__ = [
    "capture",
    "compile",
    "CompiledModel",
    "uniform_plan",
    "empty_parameters",
    "Plan",
    "LayerStrategy",
    "EmbeddingStrategy",
    "Cluster",
    "Program",
    "Layer",
    "LayerStats",
    "TensorSpec",
    "GalvatronError",
    "CaptureError",
    "ConfigError",
    "PlanError",
    "ProfileError",
]
