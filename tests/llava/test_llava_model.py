"""The MoE-LLaVA model pieces: prompt layout, upcycled stage start, batched generation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vlmoe.config import StageConfig
from vlmoe.llava.data import collate, normalize_answer, prompt_example, shard_order
from vlmoe.llava.task import evaluate_generative

DENSE, MOE = StageConfig("dense"), StageConfig("moe")


def test_prompt_layout_loss_only_on_answer_and_padding(llava_task):
    tok = llava_task.tokenizer
    a = prompt_example(tok, 0, 0, "what color is the shape?", "red")
    b = prompt_example(tok, 1, 1, "is there a circle in the image?", "yes")
    V = 4
    batch = collate([a, b], V, tok.pad_id, images=torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    assert batch.image_mask.sum(1).tolist() == [V, V]
    # the V visual positions follow "<|im_start|>user\n"
    start = len(a.before)
    assert batch.image_mask[0, start : start + V].all() and not batch.image_mask[0, :start].any()
    # labels: exactly the answer ids (ending with end of turn), -100 elsewhere
    got = batch.labels[0][batch.labels[0] != -100].tolist()
    assert got == tok.encode("red<|im_end|>") and got[-1] == tok.eos_id
    assert tok.decode(batch.input_ids[0][batch.attention_mask[0].bool()].tolist()).endswith("red")
    # right padding for training; left padding for prompts to generate from
    assert batch.attention_mask[0, -1] == 0 or batch.attention_mask[1, -1] == 0
    left = collate([dataclasses.replace(a, answer=None), dataclasses.replace(b, answer=None)],
                   V, tok.pad_id, left_pad=True)  # fmt: skip
    assert left.labels is None and bool(left.attention_mask[:, -1].all())


def test_normalize_answer():
    assert normalize_answer(" The Red. ") == "red"
    assert normalize_answer("a red  triangle!") == "red triangle"
    assert normalize_answer("Yes") != normalize_answer("no")


def test_shards_partition_each_global_batch():
    whole = list(shard_order(40, 8, seed=3, epoch=1, start=0, rank=0, world=1))
    parts = [list(shard_order(40, 8, 3, 1, 0, r, 2)) for r in range(2)]
    for b, glob in enumerate(whole):
        assert sorted(parts[0][b] + parts[1][b]) == sorted(glob)
    assert list(shard_order(40, 8, 3, 1, 2, 0, 1)) == whole[2:]  # resuming at batch 2


def _val_batch(task, n: int = 6):
    d = task.val_data
    return collate(d.examples[:n], task.cfg.model.visual_tokens, task.tokenizer.pad_id,
                   d.features, d.split.images)  # fmt: skip


def test_upcycled_stage_starts_where_the_dense_stage_ended(llava_task):
    torch.manual_seed(0)
    dense = llava_task.build_model(DENSE).eval()
    with torch.no_grad():  # make the FFNs matter: random, not the init's small values
        for n, p in dense.named_parameters():
            if ".ffn." in n:
                p.normal_(0, 0.1)
    moe = llava_task.build_model(MOE).eval()
    assert moe.lm.moe_layers() == [0, 2]
    llava_task.load_weights(moe, dense.state_dict())
    batch = _val_batch(llava_task)
    with torch.no_grad():
        a, b = dense(batch), moe(batch)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=1e-5)
    assert len(b.routing) == 2 and float(b.aux_loss) > 0


def test_cached_features_equal_the_encoder_on_pixels(llava_task):
    model = llava_task.build_model(DENSE).eval()
    batch = _val_batch(llava_task)
    d = llava_task.val_data
    from_pixels = collate(d.examples[:6], 4, llava_task.tokenizer.pad_id, None, d.split.images)
    assert from_pixels.features is None and from_pixels.images is not None
    with torch.no_grad():
        torch.testing.assert_close(model(from_pixels).logits, model(batch).logits)


@pytest.mark.parametrize("stage", [DENSE, MOE], ids=["dense", "upcycled"])
def test_batched_generation_equals_one_by_one(llava_task, stage):
    torch.manual_seed(1)
    model = llava_task.build_model(stage).eval()
    with torch.no_grad():
        for p in model.projector.parameters():
            p.normal_(0, 0.5)  # image-dependent answers
    tok, d = llava_task.tokenizer, llava_task.val_data
    prompts = [dataclasses.replace(e, answer=None) for e in d.examples[:5]]
    V = model.cfg.visual_tokens

    def gen(exs):
        b = collate(exs, V, tok.pad_id, d.features, d.split.images, left_pad=True)
        return model.generate(b, tok.eos_id, tok.pad_id, max_new_tokens=6)

    together = gen(prompts)
    assert together == [gen([p])[0] for p in prompts]
    assert any(len(t) > 0 for t in together)


def test_evaluate_generative_counts_exact_matches(llava_task):
    model = llava_task.build_model(DENSE)
    d = llava_task.val_data
    sub = type(d)(d.split.subset(range(12)), llava_task.tokenizer, None)
    answers = {}
    res = evaluate_generative(model, sub, llava_task.tokenizer, 5,
                              on_answer=lambda i, t: answers.__setitem__(i, t))  # fmt: skip
    hits = sum(normalize_answer(answers[i]) == normalize_answer(sub.split.answers[i])
               for i in range(12))  # fmt: skip
    assert res.n == 12 and len(answers) == 12 and res.accuracy == pytest.approx(hits / 12)
    assert sum(v["n"] for v in res.per_kind.values()) == 12
    assert model.training  # restored


def test_evaluate_generative_shortcut_equals_decoding_every_row(llava_task):
    """Rows whose teacher-forced argmax is the reference are not decoded; the accuracy and
    the answers must equal decoding every row. The model is fitted to 16 questions, then
    half of their references are swapped for another question's answer, so that both kinds
    of rows (shortcut and decoded) occur."""
    model = llava_task.build_model(DENSE)
    d, tok = llava_task.val_data, llava_task.tokenizer
    split = d.split.subset(range(16))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = collate(type(d)(split, tok, None).examples, model.cfg.visual_tokens, tok.pad_id,
                    None, split.images)  # fmt: skip
    for _ in range(40):
        opt.zero_grad()
        model(batch).loss.backward()
        opt.step()
    answers = list(split.answers)
    for i in range(0, 16, 2):  # another real answer, different from the reference
        answers[i] = next(a for a in d.split.answers if a != answers[i])
    sub = type(d)(dataclasses.replace(split, answers=answers), tok, None)
    runs = []
    for every in (False, True):
        got = {}
        res = evaluate_generative(model, sub, tok, 6, generate_all=every,
                                  on_answer=lambda i, t, a=got: a.__setitem__(i, t))  # fmt: skip
        runs.append((res.accuracy, res.per_kind, got))
    assert runs[0] == runs[1]
    assert 0 < runs[0][0] < 1, runs[0][0]  # both paths were taken


def test_caption_share_is_per_stage(llava_task):
    """`model.captions` gives each named stage its share of caption examples; other stages
    train on questions only."""
    import copy
    from itertools import islice

    task = copy.copy(llava_task)
    model = dataclasses.replace(task.cfg.model, captions={"align": 1.0, "dense": 0.5})
    task.cfg = dataclasses.replace(task.cfg, model=model)
    tok, shares = task.tokenizer, {}
    for name in ("align", "dense", "moe"):
        task.stage = StageConfig(name)
        rows = [tok.decode(r.tolist()) for b in islice(task.train_batches(16, 0, 0, 0, 1), 4)
                for r in b.input_ids]  # fmt: skip
        shares[name] = sum("What is in the image?" in r for r in rows) / len(rows)
    assert shares["align"] == 1.0 and shares["moe"] == 0.0
    assert 0.25 < shares["dense"] < 0.75, shares


def test_counterfactual_yes_no_questions_are_true_half_the_time_and_answered_right(llava_task):
    """Re-drawn yes/no questions: the answer agrees with the image's (colour, shape) under
    the question's own negation, only the attribute word changes, and for every question
    form about half are "yes" (the form no longer predicts the answer)."""
    import collections
    import random
    import re

    from vlmoe.data.pairs import _NEGATION, EASYVQA_COLORS, EASYVQA_SHAPES
    from vlmoe.llava.data import counterfactual_yes_no

    split, attrs = llava_task.train_split, llava_task.attributes
    rng, yes = random.Random(0), collections.defaultdict(list)
    words = EASYVQA_COLORS + EASYVQA_SHAPES
    changed = 0
    for q, a, row in zip(split.questions, split.answers, split.image_index.tolist(), strict=True):
        colour, shape = attrs[row]
        for _ in range(4):
            q2, a2 = counterfactual_yes_no(q, a, colour, shape, (rng.random(), rng.random()))
            if a not in ("yes", "no"):
                assert (q2, a2) == (q, a)
                continue
            named = [w for w in re.findall(r"[a-z]+", q2) if w in words]
            (w,) = named
            present = (a2 == "yes") != bool(_NEGATION.search(q2))
            assert present == (w in (colour, shape)), (q, a, q2, a2, colour, shape)
            assert re.sub(r"[a-z]+", lambda m: "X" if m[0] in words else m[0], q) == re.sub(
                r"[a-z]+", lambda m: "X" if m[0] in words else m[0], q2)  # fmt: skip
            form = re.sub("|".join(words), "X", q)
            yes[form].append(a2 == "yes")
            changed += q2 != q
    assert changed > 0
    for form, v in yes.items():
        if len(v) >= 40:
            assert 0.3 < sum(v) / len(v) < 0.7, (form, sum(v) / len(v))


def test_word_alignment_loss_prefers_tokens_that_are_the_words():
    from vlmoe.llava.model import word_alignment_loss

    g = torch.Generator().manual_seed(0)
    E = torch.randn(50, 16, generator=g)
    targets = torch.tensor([[3, 7], [5, -100]])
    noise = torch.randn(2, 4, 16, generator=g)
    aligned = noise.clone()
    aligned[0, 1], aligned[0, 2], aligned[1, 0] = 4 * E[3], 4 * E[7], 4 * E[5]
    assert word_alignment_loss(aligned, E, targets) < word_alignment_loss(noise, E, targets)
    none = torch.full((2, 2), -100)
    assert word_alignment_loss(noise, E, none) == 0


def test_training_batches_carry_caption_words_when_aligning(llava_task):
    import copy

    task = copy.copy(llava_task)
    task.cfg = dataclasses.replace(
        task.cfg, model=dataclasses.replace(task.cfg.model, align_words=1.0)
    )
    task.stage = DENSE
    b = next(task.train_batches(16, 0, 0, 0, 1))
    tok = llava_task.tokenizer
    for row, q in zip(b.word_ids.tolist(), b.question_index.tolist(), strict=True):
        colour, shape = task.attributes[int(task.train_split.image_index[q])]
        assert [t for t in row if t >= 0] == tok.encode(f" {colour}") + tok.encode(f" {shape}")
    model = task.build_model(DENSE).train()
    out = model(b)
    assert float(out.loss) > float(out.task_loss) and "align_loss" in out.metrics
