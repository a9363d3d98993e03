"""The methods as `peftlab adapters` lists them, readable without importing torch (the methods'
modules need it, which takes seconds): name, aliases, PEFT file type, one line. The registry is the
source; tests/test_cli.py fails when a row here differs from it."""
from __future__ import annotations

from importlib import resources

METHODS = [  # (name, aliases, peft_type, the first line of the config's docstring)
    ("adalora", (), "ADALORA", "AdaLoRA, Zhang et al. 2023 (arXiv:2303.10512): importance-pruned SVD-form update."),
    ("allora", (), "LORA", "ALLoRA, Huang & Balestriero 2024 (arXiv:2410.09692): adaptive per-row gradient scaling."),
    ("evalora", ("eva",), "LORA", "EVA, Paischer et al. 2024 (arXiv:2410.07170): LoRA initialized from activation PCA."),
    ("increlora", (), "PEFTLAB_INCRELORA",
     "IncreLoRA, Zhang et al. 2023 (arXiv:2308.12043): importance-driven rank growth."),
    ("lora", (), "LORA",
     "LoRA, Hu et al. 2021 (arXiv:2106.09685), §4.1; defaults follow common practice (r=8, α=16)."),
    ("randlora", (), "PEFTLAB_RANDLORA",
     "RandLoRA, Albert et al. 2025 (arXiv:2502.00987): full-rank update from shared random bases."),
    ("sara", (), "PEFTLAB_SARA", "SaRA, Hu et al. 2025 (arXiv:2409.06633): sparse fine-tuning of the smallest base weights."),
]


def table() -> str:
    """The methods with their recipes, as a table; `peftlab keys --adapter NAME` lists a method's fields."""
    shipped = resources.files("peftlab").joinpath("configs")
    rows = [("name", "aliases", "peft_type", "recipe", "description")]
    for name, aliases, peft_type, line in METHODS:
        recipe = f"configs/{name}.yaml" if shipped.joinpath(f"{name}.yaml").is_file() else "-"
        rows.append((name, ",".join(aliases) or "-", peft_type, recipe, line))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths)) + "  " + row[4] for row in rows)
