"""The decode core, in small parts (imports point down: options / inputs / buffers / step -> loop):

- :mod:`.options`: GenerationOptions, resolved explicit > GenerationConfig > checkpoint > defaults;
- :mod:`.inputs`: prompts -> a left-padded batch;
- :mod:`.model_set`: the models of a run and what follows from them;
- :mod:`.buffers`: the tensors a step mutates (rows as slots);
- :mod:`.step`: the decode step as free functions (what a graph captures);
- :mod:`.stops`: host-side stop checks; :mod:`.cross_vocab`: the base's re-tokenizer across vocabularies;
- :mod:`.graph_cache`: graphs per batch bucket with their buffers, pools and streams;
- :mod:`.loop`: DecodeLoop, the persistent batch and its rounds.
"""

from .buffers import DecodeBuffers
from .loop import DecodeLoop
from .model_set import ModelSet
from .options import DEFAULT_MAX_NEW_TOKENS, GenerationOptions, resolve_options
from .stops import NonFiniteLogitsError

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "DecodeBuffers",
    "DecodeLoop",
    "GenerationOptions",
    "ModelSet",
    "NonFiniteLogitsError",
    "resolve_options",
]
