"""hf_adaptive: continual learning, adaptive structure and expert sharing on top of the Hugging Face Trainer."""

__version__ = "0.1.0"

from .config import ContinualConfig  # noqa: E402
from .metrics import ContinualResult, average_accuracy, backward_transfer, forgetting, forward_transfer  # noqa: E402
from .plugins import ContinualPlugin, LossTerm  # noqa: E402
from .tasks import Task, TaskStream, builtin_suite  # noqa: E402
from .trainer import ContinualTrainer  # noqa: E402

__all__ = [
    "ContinualConfig",
    "ContinualPlugin",
    "ContinualResult",
    "ContinualTrainer",
    "LossTerm",
    "Task",
    "TaskStream",
    "__version__",
    "average_accuracy",
    "backward_transfer",
    "builtin_suite",
    "forgetting",
    "forward_transfer",
]
