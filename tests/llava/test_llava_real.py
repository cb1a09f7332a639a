"""The real parts (SmolLM2-135M-Instruct GGUF, EfficientNet-Lite0 ImageNet): one test, since
loading them takes seconds. Nothing is downloaded: both packages are installed (dev extra)."""

from __future__ import annotations

import torch
from cli_helpers import last_json, run_cli
from easy_vqa import get_test_image_paths

from vlmoe.data import load_image
from vlmoe.llava.config import LlavaConfig
from vlmoe.llava.data import collate, prompt_example
from vlmoe.llava.model import LlavaModel, build_encoder
from vlmoe.llava.task import build_lm


def test_smollm2_chat_and_the_real_vlm_answers_in_words(capsys):
    rc, out, err = run_cli(capsys, "ask", "--checkpoint", "smollm2", "--json",
                           "What is the capital of France?")  # fmt: skip
    assert rc == 0, err
    assert "Paris" in last_json(out)["answer"]

    cfg = LlavaConfig()  # the moe-llava preset's model, before any training
    torch.manual_seed(0)
    lm = build_lm(cfg, 0, moe=True)
    assert lm.moe_layers() == list(range(0, 30, 2)) and lm.config.vocab_size == 49152
    model = LlavaModel(cfg, lm, build_encoder(cfg)).eval()
    from vlmoe.lm import load_pretrained

    _, tok = load_pretrained("smollm2")
    image = load_image(get_test_image_paths()[0], cfg.image_size)
    ex = prompt_example(tok, 0, 0, "What is in the image?", None)
    batch = collate([ex], cfg.visual_tokens, tok.pad_id, images=image[None], left_pad=True)
    ids = model.generate(batch, tok.eos_id, tok.pad_id, max_new_tokens=6)[0]
    assert 0 < len(ids) <= 6 and tok.decode(ids).strip()  # words, from an untrained projector
    with_answer = collate([prompt_example(tok, 0, 0, "What is in the image?", "a red circle")],
                          cfg.visual_tokens, tok.pad_id, images=image[None])  # fmt: skip
    with torch.no_grad():
        res = model(with_answer)
    assert torch.isfinite(res.loss) and int(res.metrics["count"]) == len(
        tok.encode("a red circle<|im_end|>")
    )
