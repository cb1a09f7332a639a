"""The SmolLM2 tokenizer rebuilt from GGUF metadata, and the ChatML prompt format.

A byte-level BPE (``tokenizers``) from ``tokenizer.ggml.tokens`` and ``.merges``: digits are
split one by one, then GPT-2 byte-level pre-tokenisation without a prefix space; byte-level
decoding. Control tokens (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, …; GGUF token
type 3) are registered as special tokens, otherwise BPE would cut ``<|im_start|>`` into pieces.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from torch import Tensor

from .errors import WeightsError
from .gguf import TokenizerData

__all__ = ["ChatTokenizer", "build_bpe", "chatml"]

CONTROL = 3  # llama.cpp token type of control (special) tokens
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def build_bpe(data: TokenizerData) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` equivalent to the GGUF's GPT-2-style BPE."""
    if data.model != "gpt2":
        raise WeightsError(f"tokenizer model {data.model!r} is not supported, expected 'gpt2'")
    vocab = {t: i for i, t in enumerate(data.tokens)}
    merges = [tuple(m.split(" ", 1)) for m in data.merges]
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = [t for t, ty in zip(data.tokens, data.token_types, strict=False) if ty == CONTROL]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def chatml(
    messages: Sequence[tuple[str, str]], add_generation_prompt: bool = True,
    default_system: str | None = DEFAULT_SYSTEM,
) -> str:  # fmt: skip
    """The ChatML text of ``[(role, content), ...]`` as SmolLM2's chat template writes it.

    A default system turn is inserted when the first message is not ``system`` (as the GGUF's
    template does; ``default_system=None`` leaves it out); ``add_generation_prompt`` ends with
    an open assistant turn.
    """
    parts = []
    if default_system is not None and (not messages or messages[0][0] != "system"):
        parts.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
    parts += [f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages]
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


class ChatTokenizer:
    """A ``tokenizers.Tokenizer`` with the chat-format helpers and special ids.

    ``eos_id`` ends an assistant turn (``<|im_end|>`` for SmolLM2), ``pad_id`` pads batches.
    """

    def __init__(self, tokenizer: Tokenizer, eos_id: int, pad_id: int) -> None:
        self.tokenizer = tokenizer
        self.eos_id, self.pad_id = eos_id, pad_id

    @classmethod
    def from_gguf_data(cls, data: TokenizerData) -> ChatTokenizer:
        """Build from GGUF tokenizer data; end of turn = ``<|im_end|>`` if present, else eos."""
        tok = build_bpe(data)
        im_end = tok.token_to_id("<|im_end|>")
        eos = im_end if im_end is not None else data.eos_id
        if eos is None:
            raise WeightsError("tokenizer: GGUF file names no end-of-sequence token")
        pad = data.pad_id if data.pad_id is not None else eos
        return cls(tok, int(eos), int(pad))

    @classmethod
    def load(cls, path: str | Path, eos_id: int, pad_id: int) -> ChatTokenizer:
        """Load a ``tokenizer.json`` written by ``save``."""
        return cls(Tokenizer.from_file(str(path)), eos_id, pad_id)

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json``."""
        self.tokenizer.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        """Id of one vocabulary entry (e.g. ``"<|im_start|>"``); ``KeyError`` if absent."""
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise KeyError(token)
        return i

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special tokens in the text are recognised; no BOS added)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of ``ids`` (special tokens dropped unless ``skip_special=False``)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special)

    def pad_left(self, rows: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        """Left-pad id lists into ``ids [B, L]`` and ``attention_mask [B, L]`` (1 = token),
        the layout ``generate`` takes for a batch of prompts of different lengths."""
        L = max(len(r) for r in rows)
        ids = torch.full((len(rows), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), L), dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                ids[i, L - len(r) :] = torch.tensor(list(r))
                mask[i, L - len(r) :] = 1
        return ids, mask

    def chat_ids(self, question: str, system: str | None = DEFAULT_SYSTEM) -> list[int]:
        """Ids of a one-question ChatML prompt ending with an open assistant turn."""
        return self.encode(chatml([("user", question)], default_system=system))
