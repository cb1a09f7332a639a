"""Data: easy-VQA and JSONL splits in memory, a word tokenizer, and batches.

    split = load_data("easy-vqa", "train")            # or a path to a .jsonl file
    tok = WordTokenizer.build(split.questions)
    for batch in iterate_batches(split, tok, answers, 128, shuffle=True, epoch=e): ...

Every bad input (missing or corrupt image, invalid JSONL line, corrupt tokenizer file)
raises `DataError` with a one-line message that names the file and line.
"""

from vlmoe.data.batching import (
    IGNORE_INDEX,
    Batch,
    answer_labels,
    encoded_questions,
    iterate_batches,
    num_batches,
)
from vlmoe.data.dataset import QUESTION_KINDS, VQASplit, question_kind, split_by_image
from vlmoe.data.easyvqa import easyvqa_answers, load_easyvqa
from vlmoe.data.errors import DataError
from vlmoe.data.images import decode_image_bytes, decode_images, load_image, load_images
from vlmoe.data.jsonl import load_data, load_jsonl
from vlmoe.data.pairs import (
    EASYVQA_CAPTIONS,
    PairBatch,
    PairSet,
    easyvqa_captions,
    iterate_pair_batches,
    load_pairs_jsonl,
    twemoji_pairs,
)
from vlmoe.data.tokenizer import WordTokenizer

__all__ = [
    "EASYVQA_CAPTIONS",
    "PairBatch",
    "PairSet",
    "easyvqa_captions",
    "iterate_pair_batches",
    "load_pairs_jsonl",
    "twemoji_pairs",
    "IGNORE_INDEX",
    "QUESTION_KINDS",
    "Batch",
    "DataError",
    "VQASplit",
    "WordTokenizer",
    "answer_labels",
    "decode_image_bytes",
    "decode_images",
    "easyvqa_answers",
    "encoded_questions",
    "iterate_batches",
    "load_data",
    "load_easyvqa",
    "load_image",
    "load_images",
    "load_jsonl",
    "num_batches",
    "question_kind",
    "split_by_image",
]
