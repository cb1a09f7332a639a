"""vlmoe: sparse Mixture-of-Experts vision-language models.

`vlmoe.moe` is the MoE core, usable on its own in any PyTorch model; `vlmoe.models` builds
vision-language models on it; `vlmoe.cli` is the `vlmoe` command.
"""

__version__ = "0.1.0"
