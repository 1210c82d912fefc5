"""Byte-level BPE tokenizer of the toy world (GPT-2 style, ``<|endoftext|>`` = bos/eos/pad)."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from neuronspec.data.toyworld import EOS

VOCAB_SIZE = 1536  # room for every invented name to become one or two tokens


def train_tokenizer(
    texts: Iterable[str], *, vocab_size: int = VOCAB_SIZE
) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on ``texts``; round-trips through ``save_pretrained``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, unk_token=EOS
    )


def encode_prompt(tokenizer: PreTrainedTokenizerFast, prompt: str) -> list[int]:
    """``[bos] + ids(prompt)``: a prompt read as the start of a document, like training text."""
    return [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]


def answer_token(tokenizer: PreTrainedTokenizerFast, answer: str) -> int:
    """The first token of ``answer`` (which carries its leading space, " Daskar")."""
    return tokenizer(answer, add_special_tokens=False)["input_ids"][0]
