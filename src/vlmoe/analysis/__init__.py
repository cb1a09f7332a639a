"""Routing analysis of a trained VL-MoE: what the experts learned (`vlmoe inspect`).

stats.py    record routing over a split (`collect_routing`) and the pure numbers:
            `load_stats`, `nmi`, `specialization` (with a permutation baseline)
summary.py  `analyse`: every FFN's load and specialisation, words per text expert,
            findings in words — the content of routing.json
plots.py    load.png, specialization.png, patches.png
report.py   report.md / report.html / text_experts.md
"""

from vlmoe.analysis.stats import (
    FFNTrace,
    collect_routing,
    load_stats,
    mutual_information,
    nmi,
    patch_content,
    specialization,
)
from vlmoe.analysis.summary import VARIABLES, analyse

__all__ = [
    "VARIABLES",
    "FFNTrace",
    "analyse",
    "collect_routing",
    "load_stats",
    "mutual_information",
    "nmi",
    "patch_content",
    "specialization",
]
