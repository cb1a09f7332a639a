"""Word-level question tokenizer on the `tokenizers` library, saved as a standard tokenizer.json.

Lowercase (after NFKC) → split on whitespace and punctuation → one id per word; words not
seen at build time map to [UNK]; every encoding starts with [CLS] (the post-processor is in
the file, so `tokenizers.Tokenizer.from_file("tokenizer.json").encode(q).ids` matches too).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from vlmoe.data.errors import DataError, one_line

PAD, UNK, CLS = "[PAD]", "[UNK]", "[CLS]"
SPECIALS = (PAD, UNK, CLS)  # ids 0, 1, 2 in this order


class WordTokenizer:
    """Questions → word ids. pad_id=0, unk_id=1, cls_id=2; vocab_size counts the specials."""

    pad_id, unk_id, cls_id = 0, 1, 2

    def __init__(self, tokenizer: Tokenizer) -> None:
        for want_id, token in enumerate(SPECIALS):
            got = tokenizer.token_to_id(token)
            if got != want_id:
                raise DataError(
                    f"tokenizer: special token {token} must have id {want_id}, got {got}"
                )
        self._tok = tokenizer
        self._fingerprint: str | None = None

    @classmethod
    def build(cls, questions: Iterable[str], min_freq: int = 1) -> WordTokenizer:
        """Build the vocabulary from `questions` (the training questions): every word seen at
        least `min_freq` times. Ids follow frequency, ties alphabetical, so the same questions
        always give the same ids."""
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
        )
        trainer = trainers.WordLevelTrainer(
            special_tokens=list(SPECIALS), min_frequency=min_freq, show_progress=False
        )
        tok.train_from_iterator(questions, trainer=trainer)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{CLS} $A", special_tokens=[(CLS, cls.cls_id)]
        )
        return cls(tok)

    def save(self, path: str | os.PathLike) -> None:
        """Write a standard tokenizer.json."""
        self._tok.save(str(path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> WordTokenizer:
        """Read a tokenizer.json written by `save`; a missing or corrupt file → `DataError`."""
        if not os.path.isfile(path):
            raise DataError(f"{path}: tokenizer file not found")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exception on any parse error
            raise DataError(f"{path}: not a valid tokenizer.json ({one_line(e)[:200]})") from None
        try:
            return cls(tok)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        """A hash of the whole tokenizer, to key caches of encoded questions."""
        if self._fingerprint is None:
            self._fingerprint = hashlib.sha1(self._tok.to_str().encode()).hexdigest()
        return self._fingerprint

    def encode(self, question: str) -> list[int]:
        """[CLS] then one id per word; unknown words → unk_id."""
        return self._tok.encode(question).ids

    def encode_batch(self, questions: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ids long [B, L] padded with pad_id, mask bool [B, L] True on real tokens, where
        L = min(max_len, longest encoding). Longer questions keep their first max_len tokens
        ([CLS] included)."""
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        encodings = self._tok.encode_batch(list(questions))
        length = min(max_len, max((len(e.ids) for e in encodings), default=0))
        rows = [e.ids[:length] for e in encodings]
        pad = [self.pad_id] * length
        ids_BL = torch.tensor([r + pad[len(r) :] for r in rows], dtype=torch.long)
        ids_BL = ids_BL.reshape(len(rows), length)  # keeps [0, L] shape for an empty batch
        lengths_B = torch.tensor([len(r) for r in rows], dtype=torch.long)
        mask_BL = torch.arange(length) < lengths_B[:, None]
        return ids_BL, mask_BL

    def tokens(self, question: str) -> list[str]:
        """The words of `question` as the tokenizer splits them (lowercased), without [CLS];
        aligned one-to-one with `encode(question)[1:]`."""
        normalized = self._tok.normalizer.normalize_str(question)
        return [word for word, _ in self._tok.pre_tokenizer.pre_tokenize_str(normalized)]

    def unknown_words(self, question: str) -> list[str]:
        """The words of `question` that encode to [UNK] (for a warning at ask time)."""
        ids = self.encode(question)[1:]
        return [w for w, i in zip(self.tokens(question), ids, strict=True) if i == self.unk_id]

    def vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size})"
