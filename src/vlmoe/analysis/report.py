"""Routing analysis, the reports: one document rendered twice — `report.md` (pictures as
links to the PNGs beside it) and `report.html` (the same, pictures inline as base64, so the
file travels alone) — plus `text_experts.md`.

A document is a list of blocks: ("h1"|"h2"|"h3"|"p", text), ("ul", [text]),
("table", header, rows), ("img", file name, caption). Text may use **bold** and `code`.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any

Block = tuple

_BOLD = re.compile(r"\*\*(.+?)\*\*")
_CODE = re.compile(r"`([^`]+)`")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def build_report(result: dict[str, Any], variables: tuple[str, ...]) -> list[Block]:
    """The report's blocks from the `routing.json` content: summary and findings, expert load,
    specialisation (per variable, then per question kind / patch content), single examples and
    the words per text expert."""
    return (
        _summary_blocks(result)
        + _load_blocks(result["ffns"])
        + _specialization_blocks(result["ffns"], variables)
        + _breakdown_blocks(result["ffns"])
        + _examples_blocks(result)
    )


def _summary_blocks(result: dict[str, Any]) -> list[Block]:
    """Title, one paragraph on what was analysed, the findings and how to read an NMI."""
    meta, ffns = result["meta"], result["ffns"]
    acc = meta.get("accuracy")
    summary = (
        f"Checkpoint `{meta['checkpoint']}` (preset `{meta['preset']}`) on **{meta['data']}**: "
        f"{meta['questions']:,} questions, {meta['tokens_routed']:,} routed tokens over "
        f"{len(ffns)} MoE FFNs"
        + (f"; answer accuracy {acc:.2%}" if acc is not None else "")
        + f". Analysis took {meta['seconds']:.1f} s."
    )
    how_to_read = (
        "Read NMI (normalised mutual information, 0 = the expert says nothing about the "
        "property, 1 = it determines it) against the *random* column: the same NMI with the "
        "expert choices shuffled across tokens, which is what chance alone produces on this "
        "many tokens. Only the gap is evidence of specialisation."
    )
    return [
        ("h1", "Routing report"),
        ("p", summary),
        ("h2", "Findings"),
        ("ul", list(result["findings"])),
        ("p", how_to_read),
    ]


_LOAD_HEADER = (
    "FFN",
    "E",
    "tokens",
    "share % per expert (all top-k)",
    "share % (top-1)",
    "router entropy (nats) / max",
    "dropped",
    "imbalance (max/mean)",
    "effective experts",
    "dead (< 1%)",
)


def _load_blocks(ffns: dict[str, Any]) -> list[Block]:
    """The "Expert load" section: load.png and one table row per MoE FFN."""
    rows = [
        [
            f"`{name}`",
            str(f["num_experts"]),
            f"{f['tokens']:,}",
            " ".join(f"{100 * s:.0f}" for s in f["share"]),
            " ".join(f"{100 * s:.0f}" for s in f["share_top1"]),
            f"{f['entropy']:.2f} / {f['entropy_max']:.2f}",
            _pct(f["dropped"]),
            f"{f['imbalance']:.2f}",
            f"{f['effective_experts']:.1f}",
            ", ".join(map(str, f["dead"])) or "none",
        ]
        for name, f in ffns.items()
    ]
    return [
        ("h2", "Expert load"),
        ("img", "load.png", "Expert load per MoE FFN"),
        ("table", list(_LOAD_HEADER), rows),
    ]


def _specialization_blocks(ffns: dict[str, Any], variables: tuple[str, ...]) -> list[Block]:
    """The "Specialisation" section: specialization.png, a table of "NMI (random)" per FFN and
    variable ("—" where the variable does not apply, "†" where it holds by construction), and
    the note that explains the marks."""
    rows = []
    for name, f in ffns.items():
        spec = f["specialization"]
        row = [f"`{name}`"]
        for v in variables:
            s = spec.get(v)
            if s is None:
                row.append("—")
            else:
                mark = " †" if s.get("by_construction") else ""
                row.append(f"{s['nmi']:.3f} ({s['baseline']:.3f}){mark}")
        rows.append(row)
    note = (
        "† by construction: VL-MoE gives vision and text tokens separate expert sets, so the "
        "layer's choice (expert set, expert) names the modality exactly; the number is not a "
        "learned effect. Position is the patch index for vision and the word position for "
        "text; patch content is background / edge / object (pixels differing from the image's "
        "border colour). Full numbers (mutual information in bits, entropies, the share of the "
        "routing each property explains) are in `routing.json`."
    )
    return [
        ("h2", "Specialisation"),
        ("img", "specialization.png", "NMI between the chosen expert and token properties"),
        ("table", ["FFN"] + [f"{v} NMI (random)" for v in variables], rows),
        ("p", note),
    ]


def _breakdown_blocks(ffns: dict[str, Any]) -> list[Block]:
    """Per FFN, a heading and a table of the top-1 expert's share (%) of each question kind's
    and each patch content's tokens; values with no tokens are left out, FFNs without the
    breakdown are skipped."""
    doc: list[Block] = []
    for name, f in ffns.items():
        for key, title in (("by_kind", "question kind"), ("by_content", "patch content")):
            tab = f.get(key)
            if not tab:
                continue
            counts = tab["counts"]
            tot = [sum(c[v] for c in counts) for v in range(len(tab["values"]))]
            keep = [v for v in range(len(tab["values"])) if tot[v] > 0]
            doc.append(("h3", f"{name}: top-1 expert by {title} (% of that {title}'s tokens)"))
            rows = [
                [str(e)] + [f"{100 * counts[e][v] / tot[v]:.1f}" for v in keep]
                for e in range(len(counts))
            ]
            doc.append(("table", ["expert"] + [tab["values"][v] for v in keep], rows))
    return doc


def _examples_blocks(result: dict[str, Any]) -> list[Block]:
    """The "Routing of single examples" section (patches.png), followed by the content of
    text_experts.md one heading level down when the model has text MoE FFNs."""
    doc: list[Block] = [
        ("h2", "Routing of single examples"),
        ("img", "patches.png", "Top-1 expert of every patch and word for sample questions"),
    ]
    if result.get("text_experts"):
        # the same section as text_experts.md, one heading level down
        demote = {"h1": "h2", "h2": "h3", "h3": "h3"}
        for b in build_text_experts(result):
            doc.append((demote[b[0]], *b[1:]) if b[0] in demote else b)
    return doc


def build_text_experts(result: dict[str, Any]) -> list[Block]:
    """text_experts.md: per text MoE FFN, per expert, its most frequent and most
    over-represented words."""
    doc: list[Block] = [("h1", "Words per text expert")]
    doc.append(
        (
            "p",
            (
                "For each text MoE FFN and expert (top-1 choices): the words it takes most often — "
                "with the count and, in brackets, the share of *all* of that word's tokens that went "
                "to this expert — and the words most over-represented in it (lift = P(word | expert) / "
                "P(word); words with ≥ 5 tokens and ≥ 1% of the expert's tokens). `[CLS]` is the "
                "question's first token."
            ),
        )
    )
    if not result.get("text_experts"):
        doc.append(("p", "This model has no text MoE FFN."))
    for name, rows in result.get("text_experts", {}).items():
        doc.append(("h2", f"`{name}`"))
        table = []
        for r in rows:
            top = (
                ", ".join(
                    f"{w['word']} {w['count']:,} ({w['of_word']:.0%})" for w in r["top_words"]
                )
                or "—"
            )
            over = ", ".join(f"{w['word']} ×{w['lift']:.1f}" for w in r["over_represented"]) or "—"
            table.append([str(r["expert"]), _pct(r["share"]), top, over])
        doc.append(("table", ["expert", "share", "most frequent words", "over-represented"], table))
    return doc


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|")


def to_markdown(doc: list[Block]) -> str:
    out: list[str] = []
    for b in doc:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + b[1])
        elif kind == "p":
            out.append(b[1])
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in b[1]))
        elif kind == "table":
            header, rows = b[1], b[2]
            lines = ["| " + " | ".join(map(_md_cell, header)) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{b[2]}]({b[1]})")
        out.append("")
    return "\n".join(out)


def _inline_html(text: str) -> str:
    t = html.escape(text, quote=False)
    t = _BOLD.sub(r"<strong>\1</strong>", t)
    t = _CODE.sub(r"<code>\1</code>", t)
    return t.replace("*random*", "<em>random</em>").replace("*all*", "<em>all</em>")


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
code { background: #f4f4f4; padding: 0 3px; }
img { max-width: 100%; border: 1px solid #ddd; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: 0.9em; }
"""


def to_html(doc: list[Block], image_dir: Path, title: str = "vlmoe routing report") -> str:
    """The document as one self-contained HTML page (PNGs from `image_dir` inlined)."""
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
    ]
    for b in doc:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{_inline_html(b[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_inline_html(b[1])}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in b[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{_inline_html(h)}</th>" for h in b[1])
            body = "".join(
                "<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in r) + "</tr>" for r in b[2]
            )
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode((image_dir / b[1]).read_bytes()).decode("ascii")
            out.append(
                f"<figure><img alt='{html.escape(b[2])}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{html.escape(b[2])} ({html.escape(b[1])})</figcaption></figure>"
            )
    out.append("</body></html>")
    return "\n".join(out)
