"""`vlmoe export-hf`: a generative checkpoint's language model as a `transformers` folder."""

from __future__ import annotations

import argparse
import shutil

import torch

from vlmoe.validate import UsageError, check_output_dir, json_line

#: a fixed prompt on which the written folder is checked against the checkpoint
CHECK_PROMPT = "<|im_start|>user\nWhat color is the shape?<|im_end|>\n<|im_start|>assistant\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="a generative (MoE-LLaVA) checkpoint folder, smollm2 or a .gguf file")  # fmt: skip
    p.add_argument("--out", required=True, help="new folder for the transformers model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    """Write a generative checkpoint's language model as a Hugging Face transformers folder.

    The language model and its tokenizer: LlamaForCausalLM when dense, MixtralForCausalLM when upcycled (dense layers as
    identical experts). The folder is reloaded with AutoModelForCausalLM and its logits on a
    fixed prompt compared with vlmoe's before it is moved into place (fp32, ≤ 1e-4)."""
    try:
        import transformers
    except ImportError:
        raise UsageError("export-hf: needs transformers (pip install 'vlmoe[hf]')") from None
    from vlmoe.llava.family import load_llava
    from vlmoe.lm.hf import save_hf

    transformers.utils.logging.disable_progress_bar()  # stdout/stderr stay for results

    out = check_output_dir(args.out, "--out", beside=True)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"--out {out}: the folder exists and is not empty (use --overwrite)")
    ck = load_llava(args.checkpoint)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hf = save_hf(ck.lm.float(), tmp, ck.tokenizer)
    ids = torch.tensor([ck.tokenizer.encode(CHECK_PROMPT)[: ck.lm.config.max_seq_len]])
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32)
    with torch.no_grad():
        diff = float((back(ids).logits - ck.lm(ids).logits).abs().max())
    if diff > 1e-4:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"export-hf: the written model's logits differ by {diff:.2e} (> 1e-4)")
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    summary = {"out": str(out), "architecture": type(hf).__name__,
               "parameters": sum(p.numel() for p in hf.parameters()), "max_logit_diff": diff}  # fmt: skip
    if args.json:
        print(json_line(summary))
    else:
        print(f"{out}: {summary['architecture']}, {summary['parameters']:,} parameters; "
              f"logits equal to vlmoe's within {diff:.1e}")  # fmt: skip
    return 0


__all__ = ["add_arguments", "run"]
