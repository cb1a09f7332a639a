"""`vlmoe inspect` on a generative checkpoint: which experts each MoE layer gives the image
tokens, the prompt tokens and the generated answer tokens.

For each batch the answers are generated greedily, then prompt + answer is run once more
with routing recorded; every routed position is classed by ``image_mask`` (image), before
the answer (prompt) or after it (generated). Shares count top-k assignments per expert.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vlmoe.validate import UsageError, json_line

from .data import Example, collate
from .task import SplitData

KINDS = ("image", "prompt", "generated")


@torch.no_grad()
def routing_by_token_kind(model, data: SplitData, tok, n: int, batch_size: int = 32) -> dict:
    """``{layer: {kind: [E] assignment counts]}}`` over the first ``n`` examples of ``data``."""
    V, E = model.cfg.visual_tokens, model.lm.config.moe.num_experts
    counts: dict[int, torch.Tensor] = {}
    for s in range(0, min(n, len(data)), batch_size):
        part = [Example(e.index, e.image, e.before, e.after, None)
                for e in data.examples[s : min(s + batch_size, n)]]  # fmt: skip
        b = collate(part, V, tok.pad_id, data.features, data.split.images, left_pad=True)
        answers = model.generate(b, tok.eos_id, tok.pad_id)
        full = [Example(e.index, e.image, e.before, e.after, a) for e, a in zip(part, answers, strict=True)]  # fmt: skip
        fb = collate(full, V, tok.pad_id, data.features, data.split.images)
        out = model.lm(inputs_embeds=model.embed(fb), attention_mask=fb.attention_mask)
        prompt_len = torch.tensor([len(e.before) + V * (e.image >= 0) + len(e.after) for e in full])
        for r in out.routing:
            bi, pos = r.token_index[:, 0], r.token_index[:, 1]
            kind = torch.where(fb.image_mask[bi, pos], 0, torch.where(pos < prompt_len[bi], 1, 2))
            real = fb.attention_mask[bi, pos].bool()
            c = counts.setdefault(r.layer, torch.zeros(3, E))
            for k in range(r.routing.indices.shape[1]):
                idx = r.routing.indices[:, k]
                ok = real & (idx >= 0)
                c.index_put_((kind[ok], idx[ok]), torch.ones(int(ok.sum())), accumulate=True)
    return {
        layer: {k: c[i].tolist() for i, k in enumerate(KINDS)}
        for layer, c in sorted(counts.items())
    }


def inspect_command(args: argparse.Namespace) -> int:
    """Expert shares of image, prompt and generated tokens per MoE layer (routing.json)."""
    from vlmoe.cli import parse_device
    from vlmoe.data import load_data

    from .family import load_llava
    from .task import encode_split

    device = parse_device(args.device)
    ck = load_llava(args.checkpoint, device)
    if ck.model is None or not ck.lm.moe_layers():
        raise UsageError(f"--checkpoint {args.checkpoint}: has no MoE layer to inspect "
                         "(a dense or text-only model)")  # fmt: skip
    cfg = ck.config
    split = load_data(args.data or cfg.data, args.split, cfg.model.image_size,
                      cfg.train.val_fraction, cfg.train.data_seed)  # fmt: skip
    n = min(args.max_questions or 256, len(split))
    split = split.subset(range(n))
    feats = encode_split(ck.model.vision, split, cfg.model) if cfg.model.freeze_vision else None
    res = routing_by_token_kind(ck.model, SplitData(split, ck.tokenizer, feats), ck.tokenizer, n)
    out = Path(args.out or Path(ck.path) / "inspect")
    out.mkdir(parents=True, exist_ok=True)
    (out / "routing.json").write_text(json.dumps({"questions": n, "layers": res}, indent=1))
    if args.json:
        print(json_line({"out": str(out), "questions": n, "layers": res}))
        return 0
    print(f"{split.source}: {n} questions; expert share of top-{ck.lm.config.moe.top_k} "
          f"assignments per MoE layer")  # fmt: skip
    for layer, kinds in res.items():
        for k, c in kinds.items():
            tot = sum(c) or 1
            print(f"  layer {layer:>2} {k:<9} " + " ".join(f"{x / tot:5.1%}" for x in c)
                  + f"  ({int(tot)})")  # fmt: skip
    print(f"routing: {out / 'routing.json'}")
    return 0
