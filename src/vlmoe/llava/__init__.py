"""MoE-LLaVA: a vision encoder and projector in front of a pretrained language model whose FFNs
are upcycled into experts, trained in stages. config.py (LlavaRunConfig, presets), model.py
(LlavaModel), data.py (prompts, batches), task.py (GenerativeTask for `vlmoe.train`),
family.py (the `vlmoe.families` hooks: eval, ask, inspect), compare.py (`vlmoe compare
--family generative`: upcycled vs dense continuation)."""
