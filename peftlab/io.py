"""Adapters on disk, in the PEFT format: adapter_config.json + adapter_model.safetensors.

Tensor keys are PEFT's (`base_model.model.<module>.lora_A.weight`, adapter name stripped), so a
peftlab LoRA loads in `peft.PeftModel.from_pretrained` and a PEFT LoRA loads here. A third file,
peftlab.json, names the peftlab method (EVA and ALLoRA save as plain PEFT LoRA) and the format
version; it is written last and holds the SHA-256 of the other two, so a directory whose write
was interrupted between files is refused at load instead of pairing new weights with an old
config. Loading is strict (keys, shapes, finite values); every file is written atomically.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from .adapters.layer import PEFT_PREFIX as PREFIX
from .adapters.inject import AdapterState, adapters_of, delete_adapter, state_of, unwrap, wrap
from .adapters.registry import Method, get_method, list_adapters
from .settings import field_names

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFTLAB_NAME = "peftlab.json"
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, PEFTLAB_NAME)
RUN_RECORD = "run.json"  # a training run's settings and results (peftlab.run), beside its adapter
FORMAT_VERSION = 1

# PEFT config keys that describe the file or an init recipe, not the forward math.
_PEFT_METADATA = {
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "fan_in_fan_out", "megatron_core", "qalora_group_size", "ensure_weight_tying",
    "layers_pattern", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "runtime_config",
    "save_projection", "sparse", "very_sparse", "init_weights",  # how PEFT made RandLoRA's bases, which it saved
    # LoraConfig fields that PEFT's AdaLoRA / RandLoRA configs inherit and ignore (LoRA reads them)
    "r", "init_lora_weights", "use_rslora", "alpha_pattern",
}
# PEFT features that change the forward math; an adapter that turns one on is refused, not half-loaded.
_PEFT_UNSUPPORTED = {
    "use_dora", "bias", "layers_to_transform", "lora_bias", "use_qalora", "target_parameters",
    "layer_replication", "trainable_token_indices", "alora_invocation_tokens", "megatron_config",
    "velora_config", "monteclora_config", "use_bdlora", "arrow_config", "kasa_config",
}
_TARGETING = ("target_modules", "exclude_modules", "modules_to_save")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Run `write(tmp_path)` and move the result onto `path` only once it is complete on disk, with
    the permissions a plain write would give it. A failure (a full disk) leaves nothing behind and
    is an OSError naming the file and the cause."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide adapter files from the tokenizer's readers
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, Exception) and not isinstance(e, (ValueError, TypeError)):
            raise OSError(getattr(e, "errno", None) or errno.EIO, f"could not write {path} ({write_failure(e, path)})") from e
        raise


def atomic_save(directory: str | os.PathLike, save: Callable[[str], None]) -> list[str]:
    """Run `save(tmp_dir)` (a `save_pretrained`) in a temp directory beside the target and move each
    file it wrote into `directory` only once all are written: no file is ever half-written there.
    Returns the names moved."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".saving."))
    try:
        try:
            save(str(tmp))
        except Exception as e:
            raise OSError(getattr(e, "errno", None) or errno.EIO,
                          f"could not write to {out} ({write_failure(e, tmp)})") from e
        names = sorted(p.name for p in tmp.iterdir())
        for name in names:
            os.replace(tmp / name, out / name)
        return names
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_failure(error: Exception, path: Path) -> str:
    """Why a write failed, in words: torch and safetensors name a full disk only as an offset error."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    if shutil.disk_usage(path.parent).free < 1 << 20:
        return os.strerror(errno.ENOSPC)
    return f"{type(error).__name__}: {str(error)[:200]}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def refuse_overlap(output: str | os.PathLike, inputs: dict[str, str | os.PathLike | None]) -> None:
    """A command never writes where it reads: an output directory that is, contains or lies inside
    one of its inputs (an existing local path, links resolved) is refused before anything is written."""
    out = Path(output).resolve()
    for what, source in inputs.items():
        if not source or not Path(source).exists():
            continue
        src = Path(source).resolve()
        if out == src or out in src.parents or src in out.parents:
            relation = "is" if out == src else "contains" if out in src.parents else "lies inside"
            raise ValueError(f"the output directory {output} {relation} the {what} {source}; writing there would "
                             "damage it. Choose another output directory")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    try:
        text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except ValueError:
        raise ValueError(f"refusing to write a NaN or infinite setting into {path}: {data}") from None
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS")):
        if name.endswith(suffix):
            return task
    return None


def write_adapter_files(model: nn.Module, state: AdapterState, output_dir: str | os.PathLike,
                        tensors: dict[str, torch.Tensor], peft_config: dict[str, Any], sidecar: dict[str, Any]) -> Path:
    """Write adapter_model.safetensors, adapter_config.json and peftlab.json, each atomically.

    `tensors` holds the adapted layers' tensors; the modules_to_save and the generic PEFT config
    keys (task type, base model, exact target and saved modules) are added here.
    """
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in {**tensors, **_saved_modules(state)}.items()}
    config = {
        "task_type": _task_type(model), "inference_mode": True,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "modules_to_save": state.modules_to_save or None,
        **peft_config,
    }
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"refusing to save an adapter with NaN/inf values (in {', '.join(bad[:4])}); the run diverged")
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _write_json(out / CONFIG_NAME, config)
    files = {name: _sha256(out / name) for name in (WEIGHTS_NAME, CONFIG_NAME)}
    _write_json(out / PEFTLAB_NAME, {"format_version": FORMAT_VERSION, **sidecar, "files": files})  # last: seals the set
    return out


def _layer_tensors(layers: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {f"{PREFIX}{name}.{suffix}": t for name, layer in layers.items() if layer.is_active()
            for suffix, t in layer.peft_state().items()}


def _saved_modules(state: AdapterState) -> dict[str, torch.Tensor]:
    return {f"{PREFIX}{name}.{key}": tensor for name, module in state.trained.items()
            for key, tensor in module.state_dict().items()}


def adapter_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """An adapter's tensors (the active one's by default) under PEFT key names, modules_to_save included."""
    state = state_of(model, adapter_name)
    return {**_layer_tensors(state.layers), **_saved_modules(state)}


def parameters_in_adapter_file(model: nn.Module) -> dict[str, str]:
    """The active adapter's trainable parameters that its adapter file holds verbatim (the whole
    tensor, as it is): parameter name -> the file's key. LoRA's are all of them; AdaLoRA's file
    holds only the live ranks, so its parameters are not among them."""
    keys = {(t.data_ptr(), tuple(t.shape)): key for key, t in adapter_state_dict(model).items()}
    return {name: keys[(p.data_ptr(), tuple(p.shape))] for name, p in model.named_parameters()
            if p.requires_grad and (p.data_ptr(), tuple(p.shape)) in keys}


def save_adapter(model: nn.Module, output_dir: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write a wrapped model's adapters (never the base weights) to `output_dir`.

    All of them by default, in PEFT's layout: "default" in `output_dir` itself and every other
    adapter in a subdirectory of its name. With `adapter_name`, that adapter alone, in `output_dir`.
    """
    if adapter_name is not None:
        return _save_one(model, state_of(model, adapter_name), Path(output_dir))
    for name, state in adapters_of(model).states.items():
        _save_one(model, state, Path(output_dir) if name == "default" else Path(output_dir) / name)
    return Path(output_dir)


def _save_one(model: nn.Module, state: AdapterState, output_dir: Path) -> Path:
    active = [name for name, layer in state.layers.items() if layer.is_active()]
    bases = [state.layers[name].base_layer for name in active]
    peft_config = {
        **state.config.peft_fields(state.layers),
        "peft_type": state.method.peft_type,
        # the exact names wrapped, so PEFT and peftlab select the same modules whatever their matching
        "target_modules": active,
        "fan_in_fan_out": all(isinstance(b, Conv1D) for b in bases),
    }
    tensors = {**_layer_tensors(state.layers), **state.controller.shared_state()}
    return write_adapter_files(model, state, output_dir, tensors, peft_config,
                               {"method": state.method.name, "fields": state.config.peftlab_fields()})


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the adapter directory is damaged") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _method_for(saved: dict[str, Any], sidecar: dict[str, Any] | None, path: Path) -> Method:
    if sidecar is not None:
        version = sidecar.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"{path / PEFTLAB_NAME} has format_version={version!r}, newer than this peftlab reads "
                f"({FORMAT_VERSION}); upgrade peftlab (pip install -U peftlab)"
            )
        if not isinstance(sidecar.get("method"), str):
            raise ValueError(f"{path / PEFTLAB_NAME} names no method; the adapter directory is damaged")
        files = sidecar.get("files") or {}
        if not isinstance(files, dict) or not set(files) <= {CONFIG_NAME, WEIGHTS_NAME}:
            raise ValueError(f"{path / PEFTLAB_NAME} lists files other than {CONFIG_NAME} and {WEIGHTS_NAME} "
                             f"({sorted(files) if isinstance(files, dict) else files!r}); the directory is damaged or "
                             "not an adapter peftlab wrote")
        for name, digest in files.items():
            if not stat.S_ISREG(os.lstat(path / name).st_mode):  # no links, devices or pipes
                raise ValueError(f"{path / name} is not a regular file; an adapter's files are plain files")
            if _sha256(path / name) != digest:
                raise ValueError(f"{path / name} is not the file {path / PEFTLAB_NAME} was written with (an "
                                 "interrupted or mixed write); save the adapter again")
        method = get_method(sidecar["method"])
        if saved.get("peft_type") != method.peft_type:
            hint = (" (an export in HF PEFT's own format: load it with peft.PeftModel.from_pretrained)"
                    if sidecar.get("exported_as") == "peft" else "")
            raise ValueError(f"{path / PEFTLAB_NAME} says method {method.name!r} (peft_type {method.peft_type}) but "
                             f"{path / CONFIG_NAME} has peft_type {saved.get('peft_type')!r}{hint}")
        return method
    # without peftlab.json, a file's peft_type names its method: LORA -> lora, PEFTLAB_SARA -> sara
    peft_type = str(saved.get("peft_type", ""))
    by_type = {get_method(n).peft_type: get_method(n) for n in list_adapters()
               if get_method(n).peft_type.lower().removeprefix("peftlab_") == n}
    by_type.update({t: get_method(n) for n in list_adapters() for t in get_method(n).reads})
    if peft_type not in by_type:
        raise ValueError(
            f"{path / CONFIG_NAME} has peft_type={peft_type!r}; peftlab reads {sorted(by_type)}. "
            "Load other PEFT methods with peft.PeftModel.from_pretrained"
        )
    return by_type[peft_type]


def read_config(path: str | os.PathLike):
    """The method and config stored in an adapter directory (unknown PEFT keys warn, risky ones raise)."""
    path = Path(path)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            found = sorted(p.name for p in path.iterdir()) if path.is_dir() else "the directory does not exist"
            hint = " (peftlab never loads pickled adapter_model.bin files)" if (path / "adapter_model.bin").exists() else ""
            raise FileNotFoundError(f"no {name} in {path}{hint}; found: {found}")
    saved = _read_json(path / CONFIG_NAME)
    sidecar = _read_json(path / PEFTLAB_NAME) if (path / PEFTLAB_NAME).is_file() else None
    method = _method_for(saved, sidecar, path)

    risky = [k for k in _PEFT_UNSUPPORTED if saved.get(k) not in (None, False, "none", {}, [])]
    if risky:
        raise ValueError(
            f"{path / CONFIG_NAME} turns on PEFT features peftlab does not implement: "
            f"{', '.join(f'{k}={saved[k]!r}' for k in risky)}. Load it with peft.PeftModel.from_pretrained instead"
        )
    kwargs = method.config.from_peft_fields(saved)
    extra = (sidecar or {}).get("fields", {})
    if not isinstance(extra, dict) or not set(extra) <= set(field_names(method.config)):
        raise ValueError(f"{path / PEFTLAB_NAME}: its fields are not {method.name} settings: "
                         f"{sorted(set(extra) - set(field_names(method.config))) if isinstance(extra, dict) else extra!r}")
    conflicts = {k: (v, kwargs[k]) for k, v in extra.items() if k in kwargs and kwargs[k] != v}
    if conflicts:  # PEFT reads adapter_config.json alone: both libraries must compute the same thing
        raise ValueError(f"{path / PEFTLAB_NAME} and {path / CONFIG_NAME} disagree on "
                         + ", ".join(f"{k} ({a!r} vs {b!r})" for k, (a, b) in conflicts.items())
                         + "; the directory is damaged or was edited by hand")
    kwargs.update(extra)
    for key in _TARGETING:
        value = saved.get(key)
        if isinstance(value, list):
            value = tuple(value)
        if value is not None or key == "modules_to_save":
            kwargs[key] = value if value is not None else ()
    unknown = sorted(set(saved) - method.config.peft_keys() - _PEFT_METADATA - _PEFT_UNSUPPORTED - set(_TARGETING))
    if unknown:
        warnings.warn(f"{path / CONFIG_NAME}: ignoring keys peftlab does not know: {', '.join(unknown)}", stacklevel=3)
    return method, method.config(**kwargs)


def saved_adapters(path: str | os.PathLike) -> dict[str, Path]:
    """The adapters a directory holds in PEFT's layout: itself as "default" and each subdirectory
    with adapter files as an adapter of its name (a run's checkpoint-N directories are not adapters
    of the run). Just the directory itself, as "default", when it holds no such subdirectory."""
    path = Path(path)
    found = {"default": path} if (path / CONFIG_NAME).is_file() else {}
    if path.is_dir():
        for sub in sorted(p for p in path.iterdir() if p.is_dir()):
            if (sub / CONFIG_NAME).is_file() and not re.fullmatch(r"checkpoint-\d+", sub.name):
                found[sub.name] = sub
    return found or {"default": path}  # reading it then names what is missing


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> nn.Module:
    """Wrap `model` as the adapters in `path` describe and load their weights; returns `model`.

    Without `adapter_name`, every adapter of a PEFT multi-adapter directory is loaded (itself as
    "default", subdirectories under their names); with it, the adapter in `path` is loaded under
    that name. On a wrapped model they are added beside its adapters (the active one stays).
    Strict: every wrapped layer must find its tensors, every tensor must find its layer, and
    every shape must fit, otherwise nothing is loaded and the error lists the differences.
    """
    found = {adapter_name: Path(path)} if adapter_name is not None else saved_adapters(path)
    loaded: list[str] = []
    try:
        for name, directory in found.items():
            _load_one(model, directory, name)
            loaded.append(name)
    except Exception:
        for name in reversed(loaded):
            _remove(model, name)
        raise
    return model


def _load_one(model: nn.Module, path: Path, adapter_name: str) -> None:
    _, config = read_config(path)
    try:
        tensors = load_file(str(path / WEIGHTS_NAME))
    except Exception as e:  # safetensors' own error names no file
        raise ValueError(f"{path / WEIGHTS_NAME} cannot be read ({e}); the file is truncated or not safetensors") from None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path / WEIGHTS_NAME} holds NaN/inf values in {len(bad)} tensors ({', '.join(bad[:3])}); "
                         "it is damaged or from a diverged run")
    modules = dict(model.named_modules())
    absent = [n for n in config.modules_to_save or () if n not in modules
              and not any(k.startswith(f"{PREFIX}{n}.") for k in tensors)]
    if absent:  # PEFT's SEQ_CLS lists every head name it knows ("classifier", "score"); a model has one
        config = replace(config, modules_to_save=tuple(n for n in config.modules_to_save if n not in absent))
    wrap(model, config, adapter_name=adapter_name)
    try:
        _load_tensors(state_of(model, adapter_name), tensors, path)
    except Exception:
        _remove(model, adapter_name)
        raise


def _remove(model: nn.Module, adapter_name: str) -> None:
    if len(adapters_of(model).states) == 1:
        unwrap(model)
    else:
        delete_adapter(model, adapter_name)


def _load_tensors(state: AdapterState, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected = {**_layer_tensors(state.layers), **_saved_modules(state)}
    missing = sorted(set(expected) - set(tensors))
    others = set(tensors) - set(expected)  # a controller's own (RandLoRA's bases), else unexpected
    unexpected = sorted(others - state.controller.load_shared_state({k: tensors[k] for k in others}))
    if missing or unexpected:
        lines = [f"{path / WEIGHTS_NAME} does not fit this model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}")
        lines.append("Is this the base model the adapter was trained on?")
        raise ValueError("\n".join(lines))
    wrong = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if tensors[k].shape != v.shape]
    if wrong:
        raise ValueError(
            f"{path / WEIGHTS_NAME} has shapes that do not fit this base model "
            f"(a different model size?): {'; '.join(wrong[:4])}"
        )
    for name, layer in state.layers.items():
        prefix = f"{PREFIX}{name}."
        layer.load_peft_state({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    for name, module in state.trained.items():
        prefix = f"{PREFIX}{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})


def export_lora(model: nn.Module, output_dir: str | os.PathLike, rank: int | None = None) -> dict[str, float]:
    """Write any wrapped model's adapter as a plain PEFT LoRA (scale 1, per-module ranks in
    rank_pattern) that every LoRA loader and server understands.

    Low-rank methods export their exact factors; with `rank`, or for full-rank methods, each
    update is the truncated SVD of its delta. Returns each module's relative Frobenius error
    ‖BA − ΔW‖ / ‖ΔW‖ (0 where the export is exact).
    """
    if rank is not None and rank < 1:
        raise ValueError(f"the export rank must be >= 1, got {rank}")
    state = state_of(model)
    tensors, ranks, errors = {}, {}, {}
    for name, layer in state.layers.items():
        a, b = layer.lora_factors(rank)
        delta = layer.delta_weight()
        errors[name] = ((b @ a - delta).norm() / delta.norm()).item() if delta.any() else 0.0
        if a.shape[0] == 0:
            continue  # a module pruned to rank 0 contributes nothing
        ranks[name] = a.shape[0]
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b
    if not ranks:
        raise ValueError("every adapted module has a zero update; there is nothing to export")
    top = max(ranks.values())
    peft_config = {
        "peft_type": "LORA", "bias": "none", "r": top, "lora_alpha": top, "lora_dropout": 0.0, "use_rslora": False,
        "init_lora_weights": True, "target_modules": list(ranks),
        "rank_pattern": ranks, "alpha_pattern": dict(ranks),  # alpha = r: scale 1, the factors carry it
        "fan_in_fan_out": all(isinstance(state.layers[n].base_layer, Conv1D) for n in ranks),
    }
    write_adapter_files(model, state, output_dir, tensors, peft_config,
                        {"method": "lora", "exported_from": state.method.name})
    return errors


def export_peft(model: nn.Module, output_dir: str | os.PathLike) -> Path:
    """Write the adapter in HF PEFT's own format where it differs from peftlab's file (RandLoRA:
    PEFT's RANDLORA with the bases included), so `peft.PeftModel.from_pretrained` loads it with
    identical outputs. Methods that already save as PEFT's type only need `save_adapter`."""
    state = state_of(model)
    native = state.config.peft_native(state.layers)
    if native is None:
        raise ValueError(f"{state.method.name} adapters need no conversion: save_adapter writes PEFT type "
                         f"{state.method.peft_type!r}" + ("" if not state.method.peft_type.startswith("PEFTLAB_")
                         else ", which HF PEFT has no method for; export it as a LoRA (export_lora)"))
    tensors, peft_config = native
    return write_adapter_files(model, state, output_dir, tensors, peft_config,
                               {"method": state.method.name, "exported_as": "peft"})
