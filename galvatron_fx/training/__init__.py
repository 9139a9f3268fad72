"""Training runs from the command line and the examples: options (``arguments``), what to train on
(``sources``), the figures a user watches (``figures``) and the run itself (``run``)."""

from .arguments import add_training_arguments
from .run import train, train_example

__all__ = ["add_training_arguments", "train", "train_example"]
