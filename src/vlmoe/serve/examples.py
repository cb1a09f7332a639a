"""Example images for the page: a few easy-VQA test images (shipped in the `easy-vqa` pip
package), read once into memory so that the server never opens a path a client names."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One example: PNG bytes, a question about it and the data set's answer."""

    png: bytes
    question: str
    answer: str


def easyvqa_examples(n: int = 6) -> list[Example]:
    """The first `n` easy-VQA test images, each with one of its questions (the i-th image's
    question i mod its count, so that the examples mix colour, shape and yes/no questions)."""
    import easy_vqa

    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    by_image: dict[int, list[int]] = {}
    for row, image_id in enumerate(image_ids):
        by_image.setdefault(image_id, []).append(row)
    out = []
    for i, image_id in enumerate(sorted(by_image)[:n]):
        row = by_image[image_id][i % len(by_image[image_id])]
        with open(paths[image_id], "rb") as f:
            out.append(Example(f.read(), questions[row], answers[row]))
    return out
