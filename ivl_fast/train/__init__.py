"""Value-network training: ``train_value_model(TrainConfig(...))`` or ``ivl-fast train``."""

from .config import SCHEMES, TrainConfig
from .data import build_dataset, make_batches, read_conversations, tokenize_conversation
from .run_dir import save_checkpoint
from .stop_request import TrainingInterrupted
from .trainer import train_value_model

__all__ = [
    "SCHEMES",
    "TrainConfig",
    "TrainingInterrupted",
    "build_dataset",
    "make_batches",
    "read_conversations",
    "save_checkpoint",
    "tokenize_conversation",
    "train_value_model",
]
