"""EVA, Explained Variance Adaptation (Paischer et al. 2024, arXiv:2410.07170): LoRA whose A is
initialized from the principal directions of each layer's input activations, with the global rank
budget redistributed across layers by explained variance.

`prepare(batches)` runs the frozen model on training batches (no optimizer step, no LR
step), keeps an incremental PCA of every target layer's inputs (padding, and label -100 tokens
for causal LMs, masked out) until its leading directions stop moving (cosine >= tau), gives the
budget r x layers to the components with the largest explained-variance ratio (at most
round(rho x r) per layer), and sets A to those directions, scaled so that A responds to the
inputs as much as a LoRA A of the same rank does, and B to zero.
Layers that share an input (q/k/v) are computed once. Before the optimizer exists the layers are trimmed to their ranks (and
rank-0 layers unwrapped); afterwards (the HF callback) unused rows stay at zero, which is exact.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import quant
from ..progress import progress
from ..settings import at_least, opt, within
from .controller import Controller
from .layer import AdapterLayer, check_rank, pattern_value
from .lora import LoRAConfig, LoRALinear
from .registry import register

LORA_ROW_NORM = 1 / math.sqrt(3)  # a kaiming-uniform row's expected norm, U(±1/√d_in) over d_in entries


class EVALinear(LoRALinear):
    """A LoRA layer whose first `rank` rows are live; rows beyond stay at zero in A and B, which
    keeps them at zero under training (each factor's gradient is the other one)."""

    def __init__(self, base_layer: nn.Module, config: "EVAConfig", name: str):
        super().__init__(base_layer, config, name)
        self.rank = self.r
        self.r_nominal, self.alpha_nominal = config.r, config.lora_alpha  # the budget share before prepare

    @staticmethod
    def rows(config: "EVAConfig", name: str, base_layer: nn.Module) -> int:
        """round(rho x r) rows before prepare (a saved adapter: its rank), at most the layer's full rank."""
        check_rank(config.r, base_layer, "r", name)
        return min(config.rank_for(name), *quant.base_shape(base_layer))

    def is_active(self) -> bool:
        return self.rank > 0

    @torch.no_grad()
    def resize(self, rows: int) -> None:
        """Keep the first `rows` rows of A and columns of B (only before an optimizer holds them)."""
        if rows != self.r:
            self.lora_A = nn.Parameter(self.lora_A[:rows].clone())
            self.lora_B = nn.Parameter(self.lora_B[:, :rows].clone())
            self.r = rows

    def set_rank(self, rank: int, alpha: float, scale: float) -> None:
        self.rank, self.alpha, self.scale = rank, alpha, scale

    @torch.no_grad()
    def initialize(self, directions: Tensor) -> None:
        """A[:rank] = directions, everything else in A and B zero (B = 0: the model is unchanged)."""
        self.lora_A.zero_()
        self.lora_A[:self.rank] = directions.to(self.lora_A)
        self.lora_B.zero_()

    def peft_state(self) -> dict[str, Tensor]:
        return {"lora_A.weight": self.lora_A.detach()[:self.rank], "lora_B.weight": self.lora_B.detach()[:, :self.rank]}


class IncrementalPCA:
    """Mean-centred incremental PCA (Ross et al. 2008; scikit-learn's IncrementalPCA), in torch."""

    def __init__(self, components: int):
        self.k, self.n = components, 0
        self.mean = self.var = self.sigma = self.directions = None
        self.converged = torch.zeros(components, dtype=torch.bool)

    @torch.no_grad()
    def update(self, x: Tensor, tau: float) -> None:
        x = x.float()
        m, batch_mean = x.shape[0], x.mean(0)
        centred = x - batch_mean
        if self.n == 0:
            self.mean, self.var = batch_mean.double(), centred.double().pow(2).mean(0)
            z = centred
        else:
            total = self.n + m
            correction = (self.mean - batch_mean.double())                  # Chan's parallel update
            self.var = (self.n * self.var + centred.double().pow(2).sum(0)
                        + self.n * m / total * correction.pow(2)) / total
            self.mean = (self.n * self.mean + x.double().sum(0)) / total
            z = torch.cat([self.sigma[:, None] * self.directions, centred,
                           math.sqrt(self.n * m / total) * correction[None].float()])
        if 2 * self.k >= min(z.shape):
            _, s, vh = torch.linalg.svd(z, full_matrices=False)
        else:  # randomized, seeded in a forked RNG: deterministic, global generator untouched
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(42)
                _, s, v = torch.svd_lowrank(z, q=2 * self.k, niter=4)
            vh = v.t()
        signs = torch.sign(vh.gather(1, vh.abs().argmax(1, keepdim=True)))  # largest entry positive
        vh = vh * signs
        previous = self.directions
        self.directions, self.sigma = vh[:self.k], s[:self.k]
        self.n += m
        if previous is not None:
            self.converged = (self.directions * previous).sum(1) >= tau     # signed cosine, unit rows

    def lora_response_scale(self, rows: Tensor) -> float:
        """The factor that gives `rows` (scaled leading directions) the response E‖A x‖² to the inputs
        seen of a LoRA A of as many kaiming-uniform rows, rows · E‖x‖² / (3 · d_in); 1/√3 (LoRA's row
        norm) for orthonormal rows on isotropic centred inputs. Uncentred: the mean reaches A too."""
        k = len(rows)
        along = self.sigma[:k].double().pow(2) / self.n + (self.directions[:k].double() @ self.mean).pow(2)  # E[(u·x)²]
        response = (rows.double().pow(2).sum(1) * along).sum()
        lora = k * (self.var.sum() + self.mean.pow(2).sum()) / (3 * self.mean.numel())
        return math.sqrt(lora / response) if response > 0 else LORA_ROW_NORM

    @property
    def ratio(self) -> Tensor:
        """Explained-variance ratio of each component: σ² / (n · Σ var)."""
        total = self.n * self.var.sum()
        if total == 0:  # a constant input has no variance to explain
            return torch.zeros_like(self.sigma, dtype=torch.double)
        return self.sigma.double().pow(2) / total


def _gather_rows(x: Tensor) -> Tensor:
    """Every process's rows, in rank order (identical on every rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([x.shape[0]], device=x.device))
    top = int(max(c.item() for c in counts))
    padded = torch.zeros(top, x.shape[1], device=x.device, dtype=x.dtype)
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(c.item())] for p, c in zip(parts, counts)])


class EVAController(Controller):
    def __init__(self, model: nn.Module, config: "EVAConfig", layers: dict[str, EVALinear]):
        super().__init__(model, config, layers)
        self.prepared = bool(config.rank_pattern)  # a loaded adapter was prepared when it was trained

    def token_mask(self, batch: dict[str, Tensor]) -> Tensor | None:
        mask = batch.get("attention_mask")
        labels = batch.get("labels")
        ids = batch.get("input_ids")
        if self.config.use_label_mask and labels is not None and ids is not None and labels.shape == ids.shape:
            mask = (labels != -100) if mask is None else mask.bool() & (labels != -100)
        return None if mask is None else mask.bool()

    @torch.no_grad()
    def prepare(self, batches: Iterable[dict[str, Tensor]]) -> None:
        cfg, model = self.config, self.model
        batches = list(batches or [])
        if not batches:
            raise ValueError("evalora's prepare needs training batches to compute its initialization")
        names = list(self.layers)
        caps = {n: self.layers[n].r for n in names}  # round(rho x r), or the layer's full rank
        budget = sum(self.layers[n].r_nominal for n in names)
        inputs: dict[str, Tensor] = {}
        mask: list[Tensor | None] = [None]

        def hook(name):
            def capture(module, args):
                x = args[0]
                if x.dim() == 3 and mask[0] is not None and mask[0].shape == x.shape[:2]:
                    x = x[mask[0]]
                inputs[name] = x.reshape(-1, x.shape[-1]).float()
            return capture

        handles = [self.layers[n].register_forward_pre_hook(hook(n)) for n in names]
        was_training = model.training
        model.eval()
        for layer in self.layers.values():
            layer.enabled = False  # the hooked inputs are the base model's own

        def run(batch: dict[str, Tensor]) -> None:
            mask[0] = self.token_mask(batch)
            inputs.clear()
            model(**{k: v for k, v in batch.items() if k != "labels"})

        try:
            run(batches[0])
            owner = self._groups(names, inputs)
            owners = sorted(set(owner.values()), key=names.index)
            for n in names:  # a group's owner computes enough components for every member
                caps[owner[n]] = max(caps[owner[n]], caps[n])
            pcas = {o: IncrementalPCA(caps[o]) for o in owners}
            pending: dict[str, list[Tensor]] = {o: [] for o in owners}
            ranks = dict(caps)
            bar = progress(total=cfg.max_batches, desc="evalora prepare",
                           quiet=dist.is_initialized() and dist.get_rank() != 0)
            for step in range(cfg.max_batches):
                active = [o for o in owners if not bool(pcas[o].converged[:max(ranks[n] for n in names if owner[n] == o)].all())]
                if not active and all(p.n for p in pcas.values()):
                    break
                if step:
                    run(batches[step % len(batches)])
                for o in active:
                    pending[o].append(_gather_rows(inputs[o]))
                    rows = torch.cat(pending[o])
                    if rows.shape[0] >= caps[o]:  # small batches (a pooler's rows) are pooled first
                        pcas[o].update(rows, cfg.tau)
                        pending[o] = []
                if all(p.n for p in pcas.values()):
                    ranks = self._allocate(names, owner, pcas, caps, budget)
                bar.update(1)
                bar.set_postfix(converged=f"{len(owners) - len(active)}/{len(owners)}")
            bar.close()
        finally:
            for handle in handles:
                handle.remove()
            for layer in self.layers.values():
                layer.enabled = True
            model.train(was_training)
        unconverged = [o for o in owners if not bool(pcas[o].converged[:ranks[o]].all())]
        if not all(p.n for p in pcas.values()):
            raise RuntimeError("evalora's prepare saw too few tokens to fit every layer; give it more or larger batches")
        if unconverged:
            warnings.warn(f"evalora: {len(unconverged)} layers had not converged (tau={cfg.tau}) after "
                          f"max_batches={cfg.max_batches}, e.g. {unconverged[0]}; their directions are used as they are")
        self._initialize(names, owner, pcas, ranks)

    def _groups(self, names: list[str], inputs: dict[str, Tensor]) -> dict[str, str]:
        """Layers fed the same input (q/k/v) share one PCA: each maps to its group's first layer."""
        owner: dict[str, str] = {}
        probe: dict[str, Tensor] = {}
        for name in names:
            x = inputs[name]
            match = next((o for o in probe if probe[o].shape == x.shape and torch.equal(probe[o], x)), None)
            owner[name] = match or name
            if match is None:
                probe[name] = x
        return owner

    @staticmethod
    def _allocate(names, owner, pcas, caps, budget) -> dict[str, int]:
        """The budget goes to the components with the largest explained-variance ratios."""
        ratio = torch.cat([pcas[owner[n]].ratio[:caps[n]] for n in names])
        layer_of = torch.cat([torch.full((caps[n],), i) for i, n in enumerate(names)])
        chosen = layer_of[torch.sort(ratio, descending=True, stable=True).indices[:budget]]
        ranks = {n: int((chosen == i).sum()) for i, n in enumerate(names)}
        for o in set(owner.values()):  # members use prefixes of the owner's components
            group = [n for n in names if owner[n] == o]
            top = max(group, key=lambda n: ranks[n])
            ranks[o], ranks[top] = ranks[top], ranks[o]
        return ranks

    def _initialize(self, names, owner, pcas, ranks) -> None:
        cfg = self.config
        trim = self.optimizer is None  # shapes may only change before an optimizer holds them
        for name in names:
            layer, pca, rank = self.layers[name], pcas[owner[name]], ranks[name]
            directions = pca.directions[:rank].clone()  # a clone: members must not whiten the owner twice
            if cfg.whiten:
                directions /= pca.sigma[:rank].sqrt()[:, None]
            if cfg.scale_rows:  # (EVAConfig.scale_rows: why the paper's unit rows are not the default)
                directions *= pca.lora_response_scale(directions)
            alpha = layer.alpha_nominal * rank / layer.r_nominal if cfg.adjust_scaling_factors else layer.alpha_nominal
            if trim:
                layer.resize(rank)
            layer.set_rank(rank, alpha, cfg.scale(rank, alpha))
            layer.initialize(directions)
        if trim:
            self.release_layers([n for n in names if ranks[n] == 0])
        self.prepared = True

    def before_optimizer_step(self, step: int) -> None:
        if not self.prepared:
            raise RuntimeError(
                "evalora's prepare step never ran, so this would train a plain LoRA with a meaningless A. Call "
                "peftlab.controller(model).prepare(batches) before building the optimizer (peftlab.Trainer "
                "and PeftlabCallback do this)")

    def state_dict(self) -> dict[str, Any]:
        return {"prepared": torch.tensor(self.prepared),
                **{f"rank.{n}": torch.tensor(layer.rank) for n, layer in self.layers.items()},
                **{f"rows.{n}": torch.tensor(layer.r) for n, layer in self.layers.items()},
                **{f"alpha.{n}": torch.tensor(float(layer.alpha)) for n, layer in self.layers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores ranks and shapes, so a resumed run never re-runs prepare (the weights follow)."""
        self.release_layers([n for n in list(self.layers) if f"rank.{n}" not in state])
        for name, layer in self.layers.items():
            rank, alpha = int(state[f"rank.{name}"]), float(state[f"alpha.{name}"])
            layer.resize(int(state[f"rows.{name}"]))
            layer.set_rank(rank, alpha, self.config.scale(rank, alpha))
        self.prepared = bool(state["prepared"])

    def report(self) -> dict[str, Any]:
        ranks = {name: layer.rank for name, layer in self.layers.items()}
        return {"budget": sum(ranks.values()), "ranks": ranks}


@register("evalora", layer=EVALinear, controller=EVAController, peft_type="LORA", aliases=("eva",))
@dataclass(frozen=True, kw_only=True)
class EVAConfig(LoRAConfig):
    """EVA, Paischer et al. 2024 (arXiv:2410.07170): LoRA initialized from activation PCA."""

    presets = {"paper": {"scale_rows": False}}
    peftlab_only = ("rho", "tau", "use_label_mask", "whiten", "adjust_scaling_factors", "scale_rows", "max_batches")

    rho: float = opt(2.0, "a layer may take up to round(rho x r) components of the global budget (1 = no redistribution)",
                     check=at_least(1))
    tau: float = opt(0.99, "a direction has converged when its cosine with the previous estimate is >= tau",
                     check=within(0, 1, closed=True))
    use_label_mask: bool = opt(True, "causal LM: leave out tokens whose label is -100 (prompt, padding)")
    whiten: bool = opt(False, "divide each direction by the square root of its singular value (PEFT's whitening)")
    adjust_scaling_factors: bool = opt(True, "alpha follows the assigned rank, so the scale stays alpha / r (PEFT's default)")
    max_batches: int = opt(100, "upper bound on the batches the PCA may see before it stops with a warning",
                           check=at_least(2))
    # the paper's A rows are unit-norm principal directions (arXiv:2410.07170 §3); along the inputs' leading
    # directions even rows of LoRA's norm 1/√3 answered ~4x more than LoRA's (MiniLM), B's steps moved the
    # output ~4x further and diverged at LoRA's higher rates: by default A answers its inputs as a LoRA A does
    scale_rows: bool = opt(True, "A's rows answer the inputs as strongly as a LoRA A's (E‖Ax‖² matched on the prepare "
                                 "batches); False = the paper's unit-norm principal directions")

    def rank_for(self, name: str) -> int:
        # before prepare every layer holds its cap round(rho x r); a saved adapter has its ranks
        return pattern_value(self.rank_pattern, name, round(self.rho * self.r))

    def peft_fields(self, layers: dict[str, AdapterLayer]) -> dict[str, Any]:
        fields = {k: v for k, v in super().peft_fields(layers).items()
                  if k in LoRAConfig.peft_keys() | {"bias"}}
        fields["rank_pattern"] = {n: layer.rank for n, layer in layers.items() if layer.is_active()}
        fields["alpha_pattern"] = {n: layer.alpha for n, layer in layers.items() if layer.is_active()}
        return fields

    @classmethod
    def peft_keys(cls) -> set[str]:
        return LoRAConfig.peft_keys()
