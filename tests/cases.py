"""One case per registered method: the config the shared oracles run it with, and its tolerances.
test_contract.py runs every oracle over CASES; a new method fails the guard until it is added."""
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Case:
    config: dict = field(default_factory=dict)
    atol: float = 1e-5
    export_rank: int | None = None  # full-rank methods export by SVD; at full rank it is exact


CASES = {
    "lora": Case({"r": 4}),
    "adalora": Case({"total_step": 20, "init_r": 6, "target_r": 2}),
    "increlora": Case({"total_step": 20, "init_r": 2, "target_r": 4}),
    "allora": Case({"r": 4}),
    "sara": Case({"total_step": 20, "target_fraction": 0.1}, export_rank=64),
    "evalora": Case({"r": 4}),
    "randlora": Case({"r": 8, "randlora_alpha": 16.0}, export_rank=64, atol=2e-5),
}
