"""Prompts, tokenizers, examples and batches of the generative (MoE-LLaVA) family.

Prompt layout (ChatML without a system turn: short sequences are most of the CPU speed)::

    <|im_start|>user\n [V visual tokens] \n{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>

Only ``{answer}<|im_end|>`` carries a loss. A text-only prompt has no visual tokens and no
newline before the question. Examples are tokenised once per split; a batch is then a few
list operations.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from vlmoe.data import VQASplit
from vlmoe.lm import ChatTokenizer

from .model import LlavaBatch

__all__ = [
    "CAPTION_QUESTION",
    "Example",
    "collate",
    "counterfactual_yes_no",
    "normalize_answer",
    "prompt_example",
    "shard_order",
    "train_bpe",
]

CAPTION_QUESTION = "What is in the image?"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces: "The Red." → "red"."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


@dataclass
class Example:
    """One tokenised prompt: ``before`` ids, then V visual tokens (if ``image`` >= 0, the
    row of the image in its split), then ``after`` ids, then ``answer`` ids (None when
    answering)."""

    index: int
    image: int
    before: list[int]
    after: list[int]
    answer: list[int] | None


def prompt_example(
    tok: ChatTokenizer, index: int, image: int, question: str, answer: str | None
) -> Example:
    """The `Example` of ``question`` (about image row ``image``, or text only when -1)."""
    tail = f"{question}<|im_end|>\n<|im_start|>assistant\n"
    if image >= 0:
        before, after = tok.encode("<|im_start|>user\n"), tok.encode("\n" + tail)
    else:
        before, after = tok.encode("<|im_start|>user\n" + tail), []
    ans = None if answer is None else tok.encode(answer + "<|im_end|>")
    return Example(index, image, before, after, ans)


def collate(
    examples: Sequence[Example], n_visual: int, pad_id: int,
    features: torch.Tensor | None = None, images: torch.Tensor | None = None,
    left_pad: bool = False, image_words: Sequence[list[int]] | None = None,
) -> LlavaBatch:  # fmt: skip
    """A `LlavaBatch` of ``examples``; ``features [N, V, F]`` / ``images [N, 3, S, S]`` and
    ``image_words`` (caption word ids per image → ``word_ids``) are indexed by each
    example's image row. Right padding for training (answers included), left padding for
    generation (prompts only: rows then end together)."""
    with_image = examples[0].image >= 0
    if any((e.image >= 0) != with_image for e in examples):
        raise ValueError("collate: a batch mixes examples with and without an image")
    rows, marks, labels = [], [], []
    for e in examples:
        vis = n_visual if with_image else 0
        ans = e.answer or []
        rows.append(e.before + [pad_id] * vis + e.after + ans)
        marks.append([0] * len(e.before) + [1] * vis + [0] * (len(e.after) + len(ans)))
        labels.append([-100] * (len(rows[-1]) - len(ans)) + ans)
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    img = torch.zeros((len(rows), L), dtype=torch.bool)
    am = torch.zeros((len(rows), L), dtype=torch.long)
    lab = torch.full((len(rows), L), -100, dtype=torch.long)
    for i, (r, m, y) in enumerate(zip(rows, marks, labels, strict=True)):
        s = slice(L - len(r), L) if left_pad else slice(0, len(r))
        ids[i, s], img[i, s], am[i, s] = torch.tensor(r), torch.tensor(m).bool(), 1
        lab[i, s] = torch.tensor(y)
    rows_idx = torch.tensor([e.image for e in examples], dtype=torch.long)
    feats = features[rows_idx] if with_image and features is not None else None
    imgs = images[rows_idx] if with_image and feats is None and images is not None else None
    has_answers = all(e.answer is not None for e in examples)
    words = None
    if with_image and image_words is not None:
        per = [image_words[e.image] for e in examples]
        words = torch.full((len(per), max(map(len, per), default=0)), -100, dtype=torch.long)
        for i, w in enumerate(per):
            words[i, : len(w)] = torch.tensor(w, dtype=torch.long)
    return LlavaBatch(ids, img, am, lab if has_answers else None, feats, imgs,
                      torch.tensor([e.index for e in examples], dtype=torch.long), words)  # fmt: skip


def shard_order(
    n: int, batch_size: int, seed: int, epoch: int, start: int, rank: int, world: int
) -> Iterator[list[int]]:
    """Indices of this rank's share of each global batch of a seeded shuffle of ``range(n)``
    (a function of seed and epoch, so resuming at batch ``start`` repeats the same order);
    the last incomplete batch is dropped. ``batch_size`` is global."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    local = batch_size // world
    for b in range(start, n // batch_size):
        glob = perm[b * batch_size : (b + 1) * batch_size]
        yield glob[rank * local : (rank + 1) * local]


def counterfactual_yes_no(
    question: str, answer: str, colour: str, shape: str, u: tuple[float, float]
) -> tuple[str, str]:
    """A yes/no question about an easy-VQA image, re-asked about the image's true colour
    (or shape) or about another one, 50/50 by ``u[0]`` (``u[1]`` picks the other value):
    ``("is there a blue shape?", "no")`` about a red triangle becomes
    ``("is there a red shape?", "yes")`` or ``("is there a teal shape?", "no")``.

    Why: in easy-VQA the question alone predicts most yes/no answers ("is there a X shape?"
    names one of 8 colours, so it is mostly "no"; the negated forms mostly "yes"), and the
    pretrained LM learns that prior long before it learns to look (measured: 80% on yes/no
    with 0% on every question against its form's prior). Re-drawn questions are true half
    the time whatever their form (counterfactual samples, Chen et al. 2020), so only the image
    tells. The answer is recomputed without parsing negation: it flips iff the new word's
    truth differs from the old one's. Questions that are not yes/no or do not name exactly
    one colour or shape come back unchanged.
    """
    if answer not in ("yes", "no"):
        return question, answer
    from vlmoe.data.pairs import EASYVQA_COLORS, EASYVQA_SHAPES

    named = [w for w in re.findall(r"[a-z]+", question) if w in EASYVQA_COLORS + EASYVQA_SHAPES]
    if len(named) != 1:
        return question, answer
    word = named[0]
    values, true = (EASYVQA_COLORS, colour) if word in EASYVQA_COLORS else (EASYVQA_SHAPES, shape)
    others = [v for v in values if v != true]
    new = true if u[0] < 0.5 else others[min(int(u[1] * len(others)), len(others) - 1)]
    flip = (word == true) != (new == true)
    new_answer = {"yes": "no", "no": "yes"}[answer] if flip else answer
    return re.sub(rf"\b{word}\b", new, question, count=1), new_answer


def train_bpe(texts: Sequence[str], vocab_size: int) -> ChatTokenizer:
    """A byte-level BPE trained on ``texts`` with the ChatML special tokens (for random LMs:
    a vocabulary of a few hundred pieces instead of SmolLM2's 49,152). Deterministic."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(sorted(set(texts)), trainer)
    return ChatTokenizer(tok, tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>"))


def split_texts(split: VQASplit) -> list[str]:
    """Every text a model of this data reads or writes (for `train_bpe`)."""
    return list(split.questions) + list(split.answers) + [CAPTION_QUESTION, "user", "assistant"]
