"""Cyclic training shared by the segmentation and nuclei trainers (nnUNet-B's checkpoint ensembles).

Cosine annealing with warm restarts; members are saved at the low-learning-rate end of
cycles; checkpoints are safetensors + JSON (no pickle), so a crashed run resumes exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from inference.manifest import sha256_file


class CyclicSchedule(Protocol):
    epochs_per_cycle: int
    iterations_per_epoch: int
    members_per_cycle: int
    drop_first_cycle: bool
    lr_max: float
    lr_min: float
    optimizer: str
    weight_decay: float


def learning_rate(config: CyclicSchedule, epoch: int, iteration: int) -> float:
    """Cosine annealing with warm restarts, per iteration."""
    t = (epoch % config.epochs_per_cycle) * config.iterations_per_epoch + iteration
    period = config.epochs_per_cycle * config.iterations_per_epoch
    return config.lr_min + (config.lr_max - config.lr_min) * (1 + math.cos(math.pi * t / period)) / 2


def is_member_epoch(config: CyclicSchedule, epoch: int) -> bool:
    cycle, within = divmod(epoch, config.epochs_per_cycle)
    if config.drop_first_cycle and cycle == 0:
        return False
    return within >= config.epochs_per_cycle - config.members_per_cycle


def make_optimizer(config: CyclicSchedule, model: torch.nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=config.lr_max, momentum=0.99, nesterov=True, weight_decay=config.weight_decay
        )
    return torch.optim.AdamW(model.parameters(), lr=config.lr_max, weight_decay=config.weight_decay)


def save_checkpoint(folder: Path, model, optimizer, *, epoch: int, rng: np.random.Generator, members: list) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt_state = optimizer.state_dict()
    scalars: dict[str, dict[str, float]] = {}
    for idx, state in opt_state["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.ndim > 0:
                tensors[f"opt.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = float(value)
    tensors["torch_rng"] = torch.get_rng_state()
    save_file(tensors, str(folder / "state.safetensors.part"))
    (folder / "state.safetensors.part").replace(folder / "state.safetensors")
    meta = {
        "epoch": epoch,
        "numpy_rng": rng.bit_generator.state,
        "members": members,
        "opt_scalars": scalars,
        "param_groups": opt_state["param_groups"],
    }
    (folder / "state.json.part").write_text(json.dumps(meta))
    (folder / "state.json.part").replace(folder / "state.json")


def load_checkpoint(folder: Path, model, optimizer, rng: np.random.Generator) -> tuple[int, list]:
    tensors = load_file(str(folder / "state.safetensors"))
    meta = json.loads((folder / "state.json").read_text())
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, values in meta["opt_scalars"].items():
        for name, value in values.items():
            state.setdefault(int(idx), {})[name] = torch.tensor(value)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["torch_rng"])
    rng.bit_generator.state = meta["numpy_rng"]
    return int(meta["epoch"]), meta["members"]


def save_member(out_dir: Path, model: torch.nn.Module, index: int) -> tuple[str, str]:
    name = f"member_{index:02d}.safetensors"
    # fp16 on disk keeps the shipped demo small; weights are cast back to fp32 on load.
    state = {
        k: (v.half() if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in model.state_dict().items()
    }
    # One metadata key only: safetensors writes metadata in hash-map order, which would make
    # the bytes (and sha256) of identical weights differ between runs.
    save_file(state, str(out_dir / name), metadata={"format": "pt"})
    return name, sha256_file(out_dir / name)
