"""The README.md (model card) written next to an hf_basis checkpoint: method, settings, compression, how to load.

`save_pretrained` of a compressed model writes it (keeping any text a README already there had, outside the
hf_basis section), and `push_to_hub` merges it into the README already on the Hub the same way.
"""

from __future__ import annotations

import logging
import re

from torch import nn

__all__ = ["merge_model_card", "model_card", "model_card_section"]

logger = logging.getLogger(__name__)

SECTION_START = "<!-- hf_basis:start -->"
SECTION_END = "<!-- hf_basis:end -->"
# transformers' own placeholder card (ModelCard template) carries this line: such a card is replaced, not kept.
_TEMPLATE_MARK = "This model card has been automatically generated"

_AUTO_CLASSES = (
    ("ForCausalLM", "AutoModelForCausalLM"),
    ("LMHeadModel", "AutoModelForCausalLM"),
    ("ForMaskedLM", "AutoModelForMaskedLM"),
    ("ForConditionalGeneration", "AutoModelForSeq2SeqLM"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForTokenClassification", "AutoModelForTokenClassification"),
)


def auto_class_name(model: nn.Module) -> str:
    """The transformers Auto class that loads this model's head (AutoModel for a bare encoder/decoder)."""
    name = type(model).__name__
    return next((auto for suffix, auto in _AUTO_CLASSES if name.endswith(suffix)), "AutoModel")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def model_card_section(model: nn.Module, repo_id: str | None = None) -> str:
    """The hf_basis part of the card, between SECTION_START and SECTION_END markers."""
    from hf_basis.integrations.config import BasisConfig
    from hf_basis.report import report

    cfg = BasisConfig.from_hf_basis_config(model.hf_basis_config)
    try:
        rep = report(model)
    except Exception as err:  # a card without the table beats a failed save
        logger.warning("hf_basis: no compression table in the model card (%s: %s)", type(err).__name__, err)
        rep = None
    where = repo_id or "path/to/this/folder"
    which = {"both": "The input embedding and the output layer (lm_head)", "input": "The input embedding",
             "output": "The output layer (lm_head)", "embeddings": "The embedding layers"}[cfg.modules]  # fmt: skip
    tied = " (one table, shared by the tied input and output layers)" if cfg.tied else ""
    auto = auto_class_name(model)
    if cfg.method == "basis":
        method = (
            f"**basis embedding** (product quantization): every word's row is cut into num_basis = {cfg.num_basis} "
            f"sub-vectors, each stored as a code into num_clusters = {cfg.num_clusters} trainable centroids"
        )
    else:
        method = (
            f"**clipped uniform quantization** (SmallFry): every value stored in nbit = {cfg.nbit} bits plus a "
            "level table"
        )
    rows = "" if rep is None else "\n".join(
        f"| `{layer.name}` | {layer.kind}{' (tied to `' + layer.tied_to + '`)' if layer.tied_to else ''} "
        f"| {layer.shape[0]} x {layer.shape[1]} | {_human(layer.bytes_before)} | {_human(layer.bytes_after)} "
        f"| {'shared' if layer.tied_to else f'{layer.ratio:.1f}x'} "
        f"| {'-' if layer.relative_error is None else f'{layer.relative_error:.4f}'} |"
        for layer in rep.layers
    )
    table = "" if rep is None else (
        f"Compression ({_human(rep.bytes_before)} -> {_human(rep.bytes_after)}, **{rep.compression_ratio:.1f}x** on "
        "the compressed layers):\n\n"
        "| module | kind | shape | dense | compressed | ratio | relative error |\n"
        "|---|---|---|---|---|---|---|\n" + rows + "\n\n"
    )
    settings = {
        "method": cfg.method,
        "num_basis": cfg.num_basis,
        "num_clusters": cfg.num_clusters,
        "nbit": cfg.nbit,
        "modules": cfg.modules,
        "tied": cfg.tied,
        "seed": cfg.seed,
        "hf_basis version": cfg.hf_basis_version,
    }
    settings_rows = "\n".join(f"| {k} | `{v}` |" for k, v in settings.items() if v is not None)
    return f"""{SECTION_START}
## Compressed with hf_basis

{which} of this model {"are" if cfg.modules in ("both", "embeddings") else "is"} stored compressed by
hf_basis {cfg.hf_basis_version}: {method}{tied}.
Everything else is the original {type(model).__name__}.

| setting | value |
|---|---|
{settings_rows}

{table}### How to load

hf_basis is not on PyPI: install it from its source (hf_basis {cfg.hf_basis_version} or newer), in a clone of its
repository:

```bash
pip install .          # or build a wheel to install elsewhere: python -m build; pip install dist/*.whl
```

```python
import hf_basis  # registers the "hf_basis" quantization method with transformers
from transformers import {auto}

model = {auto}.from_pretrained("{where}")
```

Without `import hf_basis`, transformers does not know the `hf_basis` quantization method and would load the
compressed layers as randomly initialised dense ones. `model.dequantize()` turns them back into plain
`nn.Embedding` / `nn.Linear` layers.
{SECTION_END}"""


def model_card(model: nn.Module, repo_id: str | None = None) -> str:
    """A complete README.md: YAML metadata, a title and the hf_basis section."""
    base = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    title = repo_id or type(model).__name__
    meta = ["---", "library_name: transformers", "tags:", "- hf_basis", "- compressed-embeddings"]
    if base and not base.startswith(("/", ".")) and base.count("/") == 1:
        meta.append(f"base_model: {base}")
    meta.append("---")
    return "\n".join(meta) + f"\n\n# {title} (hf_basis compressed)\n\n" + model_card_section(model, repo_id) + "\n"


def merge_model_card(
    existing: str | None, model: nn.Module, repo_id: str | None = None, tags: list[str] | None = None
) -> str:
    """`existing` README text with its hf_basis section replaced (or added); a fresh card if there is none.

    `tags` (and "hf_basis") are added to the card's YAML metadata.
    """
    if not existing or not existing.strip() or (_TEMPLATE_MARK in existing and SECTION_START not in existing):
        text = model_card(model, repo_id)
    else:
        section = model_card_section(model, repo_id)
        pattern = re.compile(re.escape(SECTION_START) + r".*?" + re.escape(SECTION_END), re.DOTALL)
        if pattern.search(existing):
            text = pattern.sub(lambda _: section, existing, count=1)
        else:
            text = existing.rstrip() + "\n\n" + section + "\n"
    wanted = ["hf_basis", *(tags or [])]
    from huggingface_hub import ModelCard

    card = ModelCard(text)
    have = list(card.data.tags or [])
    if any(t not in have for t in wanted):
        card.data.tags = have + [t for t in dict.fromkeys(wanted) if t not in have]
        text = str(card)
    return text
