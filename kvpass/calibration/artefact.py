"""The calibration artefact: a versioned safetensors file (+ a JSON copy of its metadata beside it).

One file holds sections, one per calibrated method setting (e.g. "antkv-1bit"), each a set of tensors named
`<section>.<name>`. The metadata says which model it was made for (architecture numbers and a weight
fingerprint), on which text and how many tokens, and each section's parameters. `check` compares it with a
model and a method and says exactly what does not match.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import pathlib
import warnings

import torch

FORMAT = "kvpass-calibration"
VERSION = 1


def model_description(model: torch.nn.Module) -> dict:
    """Architecture numbers an artefact must agree with, and a fingerprint of the weights."""
    cfg = model.config.get_text_config(decoder=True)
    heads = cfg.num_attention_heads
    return {
        "name_or_path": str(getattr(model.config, "_name_or_path", "") or ""),
        "model_type": cfg.model_type,
        "layers": cfg.num_hidden_layers,
        "attention_heads": heads,
        "kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        "shard": shard_of(model),
        "fingerprint": fingerprint(model),
    }


def _local(param: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter: the local shard of a DTensor (tensor-parallel), else the parameter."""
    return param.to_local() if hasattr(param, "to_local") else param


def shard_of(model: torch.nn.Module) -> dict | None:
    """{"rank", "world"} of this process when the model's weights are sharded over several (HF tensor parallel:
    the parameters are DTensors), else None. A method calibrated on one shard learned that shard's KV heads and
    FFN channels only."""
    if not any(hasattr(param, "to_local") for param in model.parameters()):
        return None
    import torch.distributed as dist

    return {"rank": dist.get_rank(), "world": dist.get_world_size()}


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name, shape and first 64 values (of this process's shard under tensor
    parallelism): cheap, and different weights differ."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        local = _local(param.detach())
        digest.update(f"{name}{tuple(local.shape)}".encode())
        digest.update(local.flatten()[:64].float().cpu().numpy().tobytes())
    return digest.hexdigest()


@dataclasses.dataclass
class Calibration:
    """meta: {"format", "version", "created", "model": model_description, "text": {...}, "sections": {name:
    params}}; tensors: {"<section>.<name>": tensor} (CPU)."""

    meta: dict
    tensors: dict[str, torch.Tensor]

    @classmethod
    def new(cls, model: torch.nn.Module, text: dict) -> Calibration:
        meta = {"format": FORMAT, "version": VERSION, "model": model_description(model), "text": text,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "sections": {}}
        return cls(meta, {})

    def add_section(self, name: str, params: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.meta["sections"][name] = params
        self.tensors.update({f"{name}.{key}": value.detach().cpu().contiguous() for key, value in tensors.items()})

    def section(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.meta["sections"]:
            raise ValueError(f"the calibration artefact has no section {name!r} (it has "
                             f"{sorted(self.meta['sections'])}); calibrate for this setting: kvpass calibrate ...")
        prefix = name + "."
        return {key[len(prefix):]: value for key, value in self.tensors.items() if key.startswith(prefix)}

    def save(self, path: str | pathlib.Path) -> pathlib.Path:
        from safetensors.torch import save_file

        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(self.tensors, str(tmp), metadata={"kvpass": json.dumps(self.meta)})
        tmp.replace(path)  # atomic: a concurrent reader never sees half a file
        path.with_suffix(".json").write_text(json.dumps(self.meta, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | pathlib.Path) -> Calibration:
        from safetensors import SafetensorError, safe_open

        path = pathlib.Path(path)
        if not path.is_file():
            raise ValueError(f"calibration={str(path)!r} does not exist; make one with `kvpass calibrate --model ... "
                             f"--out {path}` or leave calibration=None to calibrate automatically")
        try:
            with safe_open(str(path), framework="pt") as handle:
                raw = (handle.metadata() or {}).get("kvpass")
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)
            meta = json.loads(raw) if raw else {}
        except (SafetensorError, json.JSONDecodeError) as error:  # a half-copied file, or not an artefact at all
            raise ValueError(f"calibration {str(path)!r} cannot be read ({error}): it is truncated or not a kvpass "
                             f"artefact; re-run `kvpass calibrate --model ... --out {path}`") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a kvpass calibration artefact (no '{FORMAT}' metadata)")
        if meta.get("version") != VERSION:
            raise ValueError(f"{path} has calibration format version {meta.get('version')}; this kvpass reads "
                             f"version {VERSION}: calibrate again with `kvpass calibrate`")
        return cls(meta, tensors)

    def check(self, model: torch.nn.Module, section: str, params: dict) -> None:
        """Raise ValueError naming each mismatch between this artefact and (model, method parameters); warn when
        only the weights differ (same architecture, e.g. a fine-tune: the codebooks may fit less well)."""
        ours, theirs = model_description(model), self.meta["model"]
        wrong = [f"{key}: artefact {theirs.get(key)!r}, model {ours[key]!r}"
                 for key in ("model_type", "layers", "attention_heads", "kv_heads", "head_dim")
                 if theirs.get(key) != ours[key]]
        if wrong:
            raise ValueError(f"the calibration artefact was made for another model ({theirs.get('name_or_path')!r}): "
                             + "; ".join(wrong) + ". Calibrate this model: kvpass calibrate --model ...")
        if theirs.get("shard") != ours["shard"]:
            def where(shard):
                return "the whole model" if shard is None else f"rank {shard['rank']} of {shard['world']}"
            raise ValueError(f"the calibration artefact was made for {where(theirs.get('shard'))} and this process "
                             f"runs {where(ours['shard'])} of a tensor-parallel model: a shard's calibration holds its "
                             f"own KV heads and FFN channels. Calibrate under the same plan, one artefact per rank "
                             f"(leave Config.calibration None under torchrun, or give each rank its own file)")
        stored = self.meta["sections"].get(section)
        if stored is None:
            raise ValueError(f"the calibration artefact has no section {section!r} (it has "
                             f"{sorted(self.meta['sections'])}): calibrate with the same method settings")
        differ = [f"{key}: artefact {stored.get(key)!r}, config {value!r}" for key, value in params.items()
                  if stored.get(key) != value]
        if differ:
            raise ValueError(f"calibration section {section!r} does not match the config: " + "; ".join(differ))
        if theirs.get("fingerprint") != ours["fingerprint"]:
            warnings.warn(f"kvpass: the calibration artefact was made for {theirs.get('name_or_path')!r} with other "
                          f"weights than this model's (same architecture); recalibrate unless that is intended",
                          stacklevel=3)
