"""Errors a user can cause. Every message names the cause and a remedy."""


class GalvatronError(Exception):
    """Base class: ``GalvatronError(cause, remedy)`` reads as "cause. remedy"."""

    def __init__(self, cause: str, remedy: str = ""):
        self.cause = cause
        self.remedy = remedy
        super().__init__(f"{cause.rstrip('.')}. {remedy}".strip() if remedy else cause)


class CaptureError(GalvatronError):
    """The model could not be captured into a Program."""


class PlanError(GalvatronError):
    """A plan is malformed, infeasible, or does not fit the model or the world."""


class ProfileError(GalvatronError):
    """A hardware or model profile is missing, corrupt, or describes something else."""


class ConfigError(GalvatronError):
    """A setting (cluster, memory budget, CLI option) is invalid."""
