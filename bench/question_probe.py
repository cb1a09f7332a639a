"""Does a VL-MoE checkpoint's answer head get told which colour a yes/no question names?

    python bench/question_probe.py --checkpoint A [B ...] [--questions 4096] [--threads 2]

The diagnosis behind README, Robustness, item 12. An easy-VQA yes/no question names one colour
("is there a red shape?") or one shape; to answer it the answer head must compare the colour
named with the colour shown. The head reads the final [CLS] token (and, with
`model.head_text = "cls+mean"`, the mean text token) beside the mean vision token. For each
checkpoint, on the colour yes/no questions about easy-VQA training pictures, linear probes
(softmax regression, fitted on 3/4 of the questions, scored on the other 1/4) read

- the colour the question names from the final [CLS] token,
- the same from the mean text token (every word's own token carries the word),
- the colour the picture shows from the mean vision token;

then, on the test set, the yes/no questions whose colour matches the picture's — 1 in 8 of the
colour questions, the ones a model that never compares answers wrong — are counted right per
colour. Prints one table row per checkpoint. Deterministic for a given machine and threads.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from vlmoe.checkpoint import CheckpointError, load_checkpoint
from vlmoe.data import iterate_batches, load_easyvqa
from vlmoe.data.render import COLORS, says_present
from vlmoe.evaluate import run_split
from vlmoe.models import VLMoE
from vlmoe.models.vlmo import text_mean
from vlmoe.train.task import scene_labels

COLOR_WORDS = list(COLORS)


def probe_accuracy(x_ND: torch.Tensor, y_N: torch.Tensor, steps: int = 300) -> float:
    """Held-out accuracy of a softmax regression x → y (fit on the first 3/4, scored on the
    rest; features standardised on the fitting part)."""
    n = x_ND.shape[0] * 3 // 4
    mu, sd = x_ND[:n].mean(0), x_ND[:n].std(0) + 1e-6
    x = (x_ND - mu) / sd
    k = int(y_N.max()) + 1
    g = torch.Generator().manual_seed(0)
    w = (0.01 * torch.randn(x.shape[1], k, generator=g)).requires_grad_()
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(x[:n] @ w + b, y_N[:n]).backward()
        opt.step()
    with torch.no_grad():
        return float(((x[n:] @ w + b).argmax(1) == y_N[n:]).float().mean())


@torch.no_grad()
def features(ck, questions: int) -> dict[str, torch.Tensor]:
    """Final [CLS], mean text and mean vision tokens [N, D] and the named / shown colour [N]
    of the colour yes/no questions among the first `questions` training questions (shuffled
    with seed 1)."""
    split = load_easyvqa("train", ck.config.model.image_size)
    scenes = scene_labels(split)
    ids = torch.tensor([ck.tokenizer.vocab()[w] for w in COLOR_WORDS])
    out: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("cls", "text", "vision", "named", "shown")
    }
    batches = iterate_batches(split, ck.tokenizer, ck.answers, 512, shuffle=True, seed=1,
                              epoch=0, drop_last=True, max_len=ck.config.model.max_text_len)  # fmt: skip
    for i, b in enumerate(batches):
        if i * 512 >= questions:
            break
        hit_BLC = b.input_ids[:, :, None] == ids
        keep = hit_BLC.any((1, 2)) & torch.tensor(
            [split.kinds[q] == "yes/no" for q in b.question_index.tolist()]
        )
        x_v, x_t, _, _ = ck.model.encode(b.images, b.input_ids, b.attention_mask)
        out["cls"].append(x_t[keep, 0])
        out["text"].append(text_mean(x_t, b.attention_mask)[keep])
        out["vision"].append(x_v[keep].mean(1))
        out["named"].append(hit_BLC.any(1).float().argmax(1)[keep])
        out["shown"].append(scenes[split.image_index[b.question_index]][keep, 0])
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def matching_right(ck) -> tuple[float, dict[str, float]]:
    """Test yes/no accuracy, and per colour the share of the yes/no questions naming the
    picture's own colour that are answered right."""
    split = load_easyvqa("test", ck.config.model.image_size)
    _, ok, _, _ = run_split(ck.model, split, ck.tokenizer, ck.answers)
    yn = [i for i, k in enumerate(split.kinds) if k == "yes/no"]
    per: dict[str, list[int]] = {c: [0, 0] for c in COLOR_WORDS}
    for i in yn:
        words = ck.tokenizer.tokens(split.questions[i])
        named = [c for c in COLOR_WORDS if c in words]
        if named and says_present(split.questions[i], split.answers[i]):
            per[named[0]][0] += int(ok[i])
            per[named[0]][1] += 1
    acc = float(ok[yn].float().mean())
    return acc, {c: r / n for c, (r, n) in per.items() if n}


def load(path: str):
    """The VL-MoE easy-VQA checkpoint at `path`, or None after one `vlmoe: error:` line."""
    try:
        ck = load_checkpoint(path)
    except CheckpointError as e:
        print(f"vlmoe: error: {e}", file=sys.stderr)
        return None
    if not isinstance(ck.model, VLMoE) or ck.config.data != "easy-vqa":
        print(f"vlmoe: error: {path}: expected a VL-MoE checkpoint trained on easy-vqa"
              " (`vlmoe train`)", file=sys.stderr)  # fmt: skip
        return None
    return ck


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", nargs="+", required=True)
    p.add_argument("--questions", type=int, default=4096, help="training questions scanned")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cks = [load(path) for path in args.checkpoint]
    if None in cks:
        return 1
    head = "| checkpoint | head reads | [CLS] → named colour | mean text → named colour |"
    head += " mean vision → shown colour | test yes/no | matching colour questions right |"
    print(head + "\n|---|---|---:|---:|---:|---:|---|")
    for path, ck in zip(args.checkpoint, cks, strict=True):
        f = features(ck, args.questions)
        yn, per = matching_right(ck)
        low = ", ".join(f"{c} {100 * a:.0f}%" for c, a in per.items() if a < 0.95) or "all ≥ 95%"
        print(
            f"| {path} | {ck.config.model.head_text}"
            f" | {100 * probe_accuracy(f['cls'], f['named']):.1f}%"
            f" | {100 * probe_accuracy(f['text'], f['named']):.1f}%"
            f" | {100 * probe_accuracy(f['vision'], f['shown']):.1f}% | {100 * yn:.2f}% | {low} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
