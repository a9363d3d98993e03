"""What the trainer minimizes, as sums: each objective returns the sum of its per-item losses and
how many items a batch holds (target tokens of a causal LM, examples of a classifier), so that an
optimizer step divides once by the items of all its micro-batches on all processes (a short answer
weighs as little under gradient accumulation as in one large batch; transformers' 4.46 fix).

A causal LM's logits are never materialized whole: while an objective runs, the model's output
head is stood in for by `TokenLogProbs`, which computes the log-probability of each target token
from the last hidden state in chunks of tokens, each chunk checkpointed (its logits recomputed in
backward, one chunk at a time). At a 49k-128k vocabulary the float32 logits of a 2048-token batch,
their softmax and their gradient are GBs; here they are one chunk's. The stand-in is called inside
the model's own forward, so DDP, FSDP2 and torch.compile see an ordinary module.
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..progress import progress

Batch = dict[str, Tensor]
CHUNK_LOGITS = 1 << 24  # logits (tokens x vocab) per chunk: 64 MB in float32
# configs whose models change the logits after the head (capping, scaling): they take the plain path
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class TokenLogProbs(nn.Module):
    """Stands in for a causal LM's output head: given the last hidden state (B, T, H), returns each
    row's summed log-probability of its targets, (B,), from `labels` (B, T) set before the forward
    (the token at t+1 is predicted at t; -100 is no target). Only target positions reach the head."""

    def __init__(self, head: nn.Module, vocab_size: int):
        super().__init__()
        self.head = head
        self.chunk = max(64, CHUNK_LOGITS // vocab_size)
        self.labels: Tensor | None = None

    def forward(self, hidden: Tensor) -> Tensor:
        if self.labels is None:  # a forward the objective did not start (EVA's data pass): plain logits
            return self.head(hidden)
        batch, length, width = hidden.shape
        h, y = hidden[:, :-1].reshape(-1, width), self.labels[:, 1:].reshape(-1)        # (B·(T-1), H), (B·(T-1),)
        rows = torch.arange(batch, device=y.device).repeat_interleave(length - 1)     # the row of every position
        if not torch.compiler.is_compiling():  # only target positions reach the head (a compiled graph keeps
            keep = (y != -100).nonzero()[:, 0]  # static shapes and lets ignore_index skip them instead)
            h, y, rows = h[keep], y[keep], rows[keep]
        sums = hidden.new_zeros(batch, dtype=torch.float32)
        for start in range(0, len(y), self.chunk):
            part = slice(start, start + self.chunk)
            logp = checkpoint(self._log_probs, h[part], y[part], use_reentrant=False)
            sums = sums.index_add(0, rows[part], logp)
        return sums

    def _log_probs(self, h: Tensor, y: Tensor) -> Tensor:
        return -F.cross_entropy(self.head(h).float(), y, reduction="none")  # 0 where y == -100


def supports_chunked_loss(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return (head is not None and model._modules.get("lm_head") is head  # its own child (not a wrapper's lookup)
            and not any(getattr(config, key, None) for key in _LOGIT_POSTPROCESSING))


@contextmanager
def log_prob_head(model: nn.Module) -> Iterator[TokenLogProbs | None]:
    """While inside, the model's `lm_head` is a TokenLogProbs (None for a model that post-processes
    its logits, which keeps its head and takes the plain path). Re-entrant: evaluation inside a
    training run uses the stand-in already there."""
    if isinstance(getattr(model, "lm_head", None), TokenLogProbs):
        yield model.lm_head
        return
    if not supports_chunked_loss(model):
        yield None
        return
    head = model.lm_head
    model.lm_head = stand_in = TokenLogProbs(head, model.config.vocab_size)
    try:
        yield stand_in
    finally:
        model.lm_head = head


def sequence_log_probs(model: nn.Module, stand_in: TokenLogProbs | None, input_ids: Tensor, labels: Tensor,
                       attention_mask: Tensor | None = None, **inputs: Tensor) -> Tensor:
    """Σ_t log p(labels[t+1] | ≤ t) of every row, (B,), through `model` (which may be DDP- or
    compile-wrapped: the forward goes through the wrapper)."""
    if stand_in is not None:
        stand_in.labels = labels
        try:
            return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **inputs).logits
        finally:
            stand_in.labels = None
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **inputs).logits[:, :-1].float()
    targets = labels[:, 1:]
    logp = -F.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none")
    return (logp * (targets != -100)).sum(1)


class Objective:
    """A training objective: `count` items in a batch, `losses` gives (sum of their losses, metric sums)."""

    def count(self, batch: Batch) -> Tensor:
        raise NotImplementedError

    def losses(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def summary(self, totals: dict[str, float], count: float) -> dict[str, float]:
        """Evaluation results from summed metrics."""
        raise NotImplementedError

    def model_inputs(self, batch: Batch) -> Batch:
        """A batch as the model itself takes it (what a data-driven init such as EVA's runs on)."""
        return batch

    def context(self, model: nn.Module):
        return nullcontext()


class Classification(Objective):
    """Cross-entropy of sequence classification; items are examples."""

    def count(self, batch: Batch) -> Tensor:
        return torch.tensor(batch["labels"].shape[0], device=batch["labels"].device)

    def losses(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        labels = batch["labels"]
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        loss = F.cross_entropy(logits, labels, reduction="sum")
        return loss, {"loss": loss.detach(), "correct": (logits.argmax(-1) == labels).sum()}

    def summary(self, totals: dict[str, float], count: float) -> dict[str, float]:
        return {"eval_loss": totals["loss"] / count, "eval_accuracy": totals["correct"] / count}


class CausalLM(Objective):
    """Next-token cross-entropy over the target tokens (labels != -100); items are target tokens."""

    def __init__(self) -> None:
        self.stand_in: TokenLogProbs | None = None

    @contextmanager
    def context(self, model: nn.Module) -> Iterator[None]:
        with log_prob_head(model) as self.stand_in:
            yield

    def count(self, batch: Batch) -> Tensor:
        return (batch["labels"][:, 1:] != -100).sum()

    def losses(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        loss = -sequence_log_probs(model, self.stand_in, **batch).sum()
        return loss, {"loss": loss.detach()}

    def summary(self, totals: dict[str, float], count: float) -> dict[str, float]:
        loss = totals["loss"] / count
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


class Preference(CausalLM):
    """DPO (Rafailov et al. 2023, arXiv:2305.18290, eq. 7) on pairs of responses to one prompt: with
    log-ratios of the policy to the reference, the loss is −log σ(β (log π/π_ref (chosen) − log π/π_ref
    (rejected))), the log-probabilities summed over response tokens. The reference is the model itself
    with its adapter disabled (no second copy of the weights), or log-probabilities precomputed into the
    examples (`ref_chosen_logp`, `ref_rejected_logp`). Items are pairs."""

    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def count(self, batch: Batch) -> Tensor:
        return torch.tensor(batch["chosen_input_ids"].shape[0], device=batch["chosen_input_ids"].device)

    def log_probs(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
        """Summed response log-probabilities of the chosen and the rejected rows, in one forward."""
        pairs = batch["chosen_input_ids"].shape[0]
        inputs = {}
        for key in ("input_ids", "attention_mask", "labels"):
            chosen, rejected = batch[f"chosen_{key}"], batch[f"rejected_{key}"]
            width = max(chosen.shape[1], rejected.shape[1])
            fill = {"input_ids": 0, "attention_mask": 0, "labels": -100}[key]
            inputs[key] = torch.cat([F.pad(chosen, (0, width - chosen.shape[1]), value=fill),
                                     F.pad(rejected, (0, width - rejected.shape[1]), value=fill)])
        logp = sequence_log_probs(model, self.stand_in, **inputs)
        return logp[:pairs], logp[pairs:]

    def model_inputs(self, batch: Batch) -> Batch:
        return {key: batch[f"chosen_{key}"] for key in ("input_ids", "attention_mask", "labels")}

    @torch.no_grad()
    def with_reference(self, model: nn.Module, dataset: Sequence[dict[str, Any]], collate: Callable,
                       batch_size: int) -> list[dict[str, Any]]:
        """The pairs with the reference's log-probabilities added (computed once, the adapter off)."""
        from ..adapters.inject import disable_adapters

        out = []
        device = next(model.parameters()).device
        with self.context(model), disable_adapters(model):
            for start in progress(range(0, len(dataset), batch_size), desc="reference"):
                rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
                batch = {k: v.to(device) for k, v in collate(rows).items()}
                chosen, rejected = self.log_probs(model, batch)
                out += [{**row, "ref_chosen_logp": c.cpu(), "ref_rejected_logp": r.cpu()}
                        for row, c, r in zip(rows, chosen, rejected)]
        return out

    def reference(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
        if "ref_chosen_logp" in batch:
            return batch["ref_chosen_logp"], batch["ref_rejected_logp"]
        from ..adapters.inject import disable_adapters

        with torch.no_grad(), disable_adapters(model):
            return self.log_probs(model, batch)

    def losses(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        chosen, rejected = self.log_probs(model, batch)
        ref_chosen, ref_rejected = self.reference(model, batch)
        reward_chosen, reward_rejected = self.beta * (chosen - ref_chosen), self.beta * (rejected - ref_rejected)
        margin = reward_chosen - reward_rejected
        loss = -F.logsigmoid(margin).sum()
        return loss, {"loss": loss.detach(), "correct": (margin > 0).sum(), "margin": margin.detach().sum(),
                      "reward_chosen": reward_chosen.detach().sum(), "reward_rejected": reward_rejected.detach().sum(),
                      "logp_chosen": chosen.detach().sum(), "logp_rejected": rejected.detach().sum()}

    def summary(self, totals: dict[str, float], count: float) -> dict[str, float]:
        return {"eval_loss": totals["loss"] / count, "eval_accuracy": totals["correct"] / count,
                **{f"eval_{k}": totals[k] / count for k in ("margin", "reward_chosen", "reward_rejected", "logp_chosen",
                                                            "logp_rejected")}}


def objective_for(model: nn.Module, example: dict[str, Any], beta: float = 0.1) -> Objective:
    """Preference pairs: DPO; token labels on a model with an output head: causal LM; one label per
    example: classification."""
    if "chosen_input_ids" in example:
        return Preference(beta)
    labels = example.get("labels")
    if labels is None:
        raise ValueError("the training examples have no 'labels'; peftlab.Trainer needs labels to compute a loss")
    sequence = torch.as_tensor(labels).dim() > 0
    has_head = hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None
    if sequence and has_head:
        return CausalLM()
    if sequence:
        raise ValueError(f"{type(model).__name__} has no output head over the vocabulary, but the examples hold "
                         "token labels; peftlab.Trainer trains causal LMs and sequence classifiers")
    return Classification()


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Sequence[dict[str, Any]], collate: Callable, objective: Objective,
             batch_size: int, accelerator: Any = None, show_progress: bool = True) -> dict[str, float]:
    """The objective's metrics over `dataset` (loss; accuracy or perplexity); with an accelerator,
    each process scores its share and the sums are added."""
    if dataset is None or len(dataset) == 0:
        raise ValueError("evaluate() needs a non-empty eval_dataset")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else next(model.parameters()).device
    mine = list(range(rank, len(dataset), world))
    batches = math.ceil(math.ceil(len(dataset) / world) / batch_size)  # the same count on every process
    totals: dict[str, Tensor] = {}
    count = torch.zeros((), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    with objective.context(model):
        for j in progress(range(0, batches * batch_size, batch_size), desc="eval", leave=False,
                          quiet=not show_progress or rank != 0):
            rows = mine[j:j + batch_size]
            # a process whose share ran out still runs a forward: a sharded model gathers weights in each
            batch = {k: v.to(device) for k, v in collate([dataset[i] for i in rows or [0]]).items()}
            with accelerator.autocast() if accelerator else nullcontext():
                _, metrics = objective.losses(model, batch)
            if rows:
                count += objective.count(batch)
                for key, value in metrics.items():
                    totals[key] = totals.get(key, 0) + value.double()
    model.train(was_training)
    names = sorted(totals)
    summed = torch.stack([count] + [totals[k] for k in names])
    if accelerator:
        summed = accelerator.reduce(summed, "sum")
    if summed[0] == 0:
        raise ValueError("the eval data has no target tokens (every label is -100); nothing to score")
    return objective.summary(dict(zip(names, summed[1:].tolist())), summed[0].item())
