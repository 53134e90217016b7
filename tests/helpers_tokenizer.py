"""A tiny byte-level BPE tokenizer trained offline in milliseconds, for tests that need real token ids.

Byte-level means every string tokenizes (no unknown token), so token counts track text length the way a
real LM tokenizer's do.
"""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

_TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "def token_windows(tokenizer, source, seqlen): return windows",
    "Sparse plus low-rank corrections on a quantized base model.",
    "for x in range(10): print(x)  # the for statement iterates over a sequence",
] * 4


@lru_cache(maxsize=1)
def _trained() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TRAINING_TEXT, trainer=trainer)
    return tok


def tiny_tokenizer(model_max_length: int = 64) -> PreTrainedTokenizerFast:
    """A fresh PreTrainedTokenizerFast with ``<eos>`` (id 0) and ``<pad>`` (id 1); vocab of 320."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_trained(),
        eos_token="<eos>",
        pad_token="<pad>",
        model_max_length=model_max_length,
    )
