"""Front ends that drive the adapter lifecycle: the Accelerate trainer and the HF callback."""
from .config import TrainConfig
from .lifecycle import NonFiniteLossError
from .trainer import Trainer

__all__ = ["NonFiniteLossError", "TrainConfig", "Trainer"]
