"""LIMoE (Mustafa et al. 2022): one tower, one shared expert pool for image patches and words,
trained contrastively. config.py (LIMoERunConfig, presets), task.py (ContrastiveTask for
`vlmoe.train`), family.py (the `vlmoe.families` hooks: eval, ask --choices, inspect),
evaluate.py (zero-shot, retrieval), inspect.py (routing by modality), compare.py (`vlmoe
compare --family contrastive`). The model is `vlmoe.models.limoe.LIMoE`."""
