"""Value-network training: ``train_value_model(TrainConfig(...))`` or ``ivl-fast train``."""

from .data import build_dataset, make_batches, read_conversations, tokenize_conversation
from .trainer import SCHEMES, TrainConfig, save_checkpoint, train_value_model

__all__ = [
    "SCHEMES",
    "TrainConfig",
    "build_dataset",
    "make_batches",
    "read_conversations",
    "save_checkpoint",
    "tokenize_conversation",
    "train_value_model",
]
