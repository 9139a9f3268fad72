"""The pass protocol: a pass is a small object with one job; a pipeline is an ordered tuple of passes.

In the spirit of torch.fx's ``PassBase`` / ``PassManager`` (``torch/fx/passes/infra/``): ``pass_(target,
context)`` returns the target rewritten (a lowering pass gets this rank's stage, an analysis pass the capture
in progress); ``requires`` and ``ensures`` check its pre- and post-conditions. ``run_passes`` runs a pipeline
in order, with the checks when ``check`` is on (the tests turn them on; ``GALVATRON_FX_CHECK_PASSES=1`` does
too), and a failing pass is reported by name together with the passes that ran before it: a user's error
(a ``GalvatronError``) keeps its type, cause and remedy; anything else is a ``PassFailure``.
"""

from __future__ import annotations

import os
import re
from typing import Any, Generic, Sequence, TypeVar

from galvatron_fx.errors import GalvatronError

Target = TypeVar("Target")
CHECK_ENV = "GALVATRON_FX_CHECK_PASSES"


class PassFailure(RuntimeError):
    """A pass raised something that is not the user's doing, or broke a condition it states."""


class Pass(Generic[Target]):
    """One step of a pipeline. Subclasses implement ``__call__`` and may state ``requires`` / ``ensures``
    (raise ``PassFailure`` when they do not hold). ``name`` defaults to the class name in snake case."""

    @property
    def name(self) -> str:
        return re.sub(r"(?<!^)(?=[A-Z])", "_", type(self).__name__).lower()

    def requires(self, target: Target, context: Any) -> None:
        """Raise PassFailure when ``target`` is not what this pass can work on."""

    def ensures(self, target: Target, context: Any) -> None:
        """Raise PassFailure when ``target`` is not what this pass promises to leave."""

    def __call__(self, target: Target, context: Any) -> Target:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


def checks_on() -> bool:
    return os.environ.get(CHECK_ENV, "") not in ("", "0")


def run_passes(passes: Sequence[Pass[Target]], target: Target, context: Any, *, check: bool | None = None) -> Target:
    """``target`` through ``passes`` in order (see the module docstring)."""
    check = checks_on() if check is None else check
    done: list[str] = []
    for pass_ in passes:
        try:
            if check:
                pass_.requires(target, context)
            target = pass_(target, context)
            if check:
                pass_.ensures(target, context)
        except GalvatronError as error:
            where = f"in pass {pass_.name}" + (f", after {', '.join(done)}" if done else "")
            raise type(error)(f"{error.cause} ({where})", error.remedy) from error
        except Exception as error:
            raise PassFailure(
                f"pass {pass_.name} failed after [{', '.join(done)}]: {type(error).__name__}: {error}"
            ) from error
        done.append(pass_.name)
    return target
