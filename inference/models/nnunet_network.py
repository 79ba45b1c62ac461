"""nnU-Net v2 networks, built from a plans file's architecture through ``dynamic_network_architectures``.

nnU-Net names its network by a dotted class path and keyword arguments, some of which are
themselves dotted paths (``conv_op``, ``norm_op``, ...) that nnU-Net resolves with
``pydoc.locate``. A manifest is a file anyone can hand over, so here only the architectures
listed in :data:`NNUNET_ARCHITECTURES` are built, and only ``torch.nn`` layer classes are
resolved; anything else is refused by name. ``dynamic_network_architectures`` is the optional
``nnunet`` extra and is imported only when an nnU-Net network is built.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from inference.errors import ModelFileError

# The nnU-Net architectures this product runs (class paths as nnU-Net v2's plans name them).
NNUNET_ARCHITECTURES = (
    "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
)
EXTRA_HINT = "pip install 'pdl1-bridge[nnunet]' (dynamic_network_architectures)"


def is_nnunet_architecture(name: str) -> bool:
    """True for the class paths of nnU-Net v2 networks (``dynamic_network_architectures....``)."""
    return name.startswith("dynamic_network_architectures.")


def check_nnunet_architecture(name: str) -> None:
    """Raise :class:`ModelFileError` unless ``name`` is one of :data:`NNUNET_ARCHITECTURES`."""
    if name not in NNUNET_ARCHITECTURES:
        known = ", ".join(a.rsplit(".", 1)[-1] for a in NNUNET_ARCHITECTURES)
        raise ModelFileError(
            f"nnU-Net architecture {name!r} is not one this product runs; it runs {known} "
            "(retrain with one of those, e.g. nnU-Net's default plans or its ResEnc plans)"
        )


def _torch_layer(path: str, *, key: str, given_in: str) -> type[nn.Module]:
    """``torch.nn.modules.conv.Conv2d`` -> the class; only ``torch.nn`` module classes are resolved."""
    if not isinstance(path, str):
        raise ModelFileError(
            f"{given_in}: architecture argument {key}={path!r}: expected the dotted name of a torch.nn layer class"
        )
    module_name, _, cls_name = path.rpartition(".")
    if not (module_name == "torch.nn" or module_name.startswith("torch.nn.modules.")):
        raise ModelFileError(
            f"{given_in}: architecture argument {key}={path!r}: only torch.nn layer classes are accepted"
        )
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as err:
        raise ModelFileError(
            f"{given_in}: architecture argument {key}={path!r} names no torch.nn class ({err})"
        ) from err
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ModelFileError(f"{given_in}: architecture argument {key}={path!r} is not a torch.nn layer class")
    return cls


def build_nnunet_network(
    architecture: str, kwargs: dict[str, Any], *, given_in: str = "the model folder's manifest.json"
) -> nn.Module:
    """Build an nnU-Net v2 network for inference (no deep supervision), as nnU-Net's predictor does.

    ``kwargs`` holds ``input_channels``, ``num_classes``, ``arch_kwargs`` and
    ``arch_kwargs_requires_import`` as nnU-Net's plans give them (``architecture.kwargs`` and
    ``architecture._kw_requires_import``); ``given_in`` names where they came from, for messages.
    Raises :class:`ModelFileError` for an architecture or layer that is not accepted, arguments
    the network refuses, and when ``dynamic_network_architectures`` is missing.
    """
    check_nnunet_architecture(architecture)
    name = architecture.rsplit(".", 1)[-1]
    if not isinstance(kwargs.get("arch_kwargs"), dict):
        raise ModelFileError(f"{given_in}: arch_kwargs of {name} must be an object, got {kwargs.get('arch_kwargs')!r}")
    # The layers named in the plans are checked first: an unsafe name is refused whether or not the extra is here.
    arch_kwargs = dict(kwargs["arch_kwargs"])
    for key in kwargs.get("arch_kwargs_requires_import", []):
        if arch_kwargs.get(key) is not None:
            arch_kwargs[key] = _torch_layer(arch_kwargs[key], key=key, given_in=given_in)
    try:
        module = importlib.import_module(architecture.rpartition(".")[0])
    except ImportError as err:
        raise ModelFileError(
            f"{architecture.rsplit('.', 1)[-1]} is an nnU-Net network; building it needs the nnunet extra: {EXTRA_HINT}"
        ) from err
    arch_kwargs["deep_supervision"] = False
    cls = getattr(module, name)
    try:
        return cls(input_channels=int(kwargs["input_channels"]), num_classes=int(kwargs["num_classes"]), **arch_kwargs)
    # dynamic_network_architectures checks its arguments with assert and lets the rest fail where they are used.
    except (AssertionError, TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError) as err:
        raise ModelFileError(
            f"{given_in}: its arch_kwargs do not build a {name} ({type(err).__name__}: {err or 'a check failed'}); "
            "the arguments must be as nnU-Net v2's planner writes them: plan the dataset again "
            "(nnUNetv2_plan_and_preprocess) and train, or copy plans.json again from the results folder"
        ) from err
