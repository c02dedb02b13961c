"""``model.optimizer``: any ``torch.optim.Optimizer`` class, named by ``_target_``, with its own arguments beside it.

    optimizer:
      _target_: torch.optim.AdamW      # the default, also when the key is absent (configs older than it)
      lr: 1.0e-5
      weight_decay: 1.0e-2
      fused: true                      # the fused kernel: only on CUDA, only for optimizers that take `fused`

Every other key is passed to the class unchanged, except that a key set to null is left out (the
optimizer's own default applies), so one block serves AdamW, ``transformers.optimization.Adafactor``
and ``bitsandbytes.optim.AdamW8bit`` (the ``bnb`` extra). :func:`check_optimizer` refuses a bad block
with one line before the model loads.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Iterable, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from common.errors import InputError

KEY = "model.optimizer"
DEFAULT_TARGET = "torch.optim.AdamW"
# optional packages an optimizer can come from, and how to install each
INSTALL = {"bitsandbytes": "pip install bitsandbytes (or this project's extra: pip install -e '.[bnb]')"}


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _as_dict(spec: Mapping[str, Any] | DictConfig | None) -> dict[str, Any]:
    """The block as a plain dict (``None``: all defaults)."""
    if spec is None:
        return {}
    if isinstance(spec, DictConfig):
        spec = OmegaConf.to_container(spec, resolve=True)
    if not isinstance(spec, Mapping):
        raise InputError(f"{KEY}: expected a mapping of _target_ and the optimizer's arguments, got {spec!r}")
    return dict(spec)


def _target(cfg: Mapping[str, Any]) -> str:
    return str(cfg.get("_target_") or DEFAULT_TARGET)


def optimizer_class(spec: Mapping[str, Any] | DictConfig | None) -> type[torch.optim.Optimizer]:
    """The class named by ``_target_`` (default ``torch.optim.AdamW``); one line when it cannot be imported,
    does not exist, or is not a ``torch.optim.Optimizer`` subclass."""
    target = _target(_as_dict(spec))
    module_name, _, name = target.rpartition(".")
    if not module_name or not name:
        raise InputError(f"{KEY}._target_: expected a dotted class path such as {DEFAULT_TARGET}, got {target!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = (error.name or module_name).split(".")[0]
        if missing == module_name.split(".")[0] and missing in INSTALL:
            raise InputError(f"{KEY}._target_: {target} needs {missing}, which is not installed: {INSTALL[missing]}") from None
        raise InputError(f"{KEY}._target_: cannot import {module_name} for {target} ({_first_line(error)})") from None
    except Exception as error:  # installed but broken, e.g. a native library that does not load
        raise InputError(f"{KEY}._target_: importing {module_name} for {target} failed ({_first_line(error)})") from None
    cls = getattr(module, name, None)
    if cls is None:
        raise InputError(f"{KEY}._target_: {module_name} has no {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise InputError(f"{KEY}._target_: {target} is not a torch.optim.Optimizer class")
    return cls


def _takes(cls: type, argument: str) -> bool:
    parameters = inspect.signature(cls.__init__).parameters
    return argument in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def build_optimizer(params: Iterable[torch.nn.Parameter], spec: Mapping[str, Any] | DictConfig | None) -> torch.optim.Optimizer:
    """The optimizer of ``spec`` over ``params``: its keys but ``_target_``, ``fused`` and the null ones are the
    class's arguments; ``fused: true`` is passed on when the class takes it and every parameter is on CUDA."""
    cfg = _as_dict(spec)
    cls = optimizer_class(cfg)
    target = _target(cfg)
    kwargs = {k: v for k, v in cfg.items() if k not in ("_target_", "fused") and v is not None}
    unknown = sorted(k for k in kwargs if not _takes(cls, k))
    if unknown:
        raise InputError(f"{KEY}: {target} takes no argument {', '.join(unknown)} (set it to null to leave it out)")
    params = list(params)
    if cfg.get("fused") and _takes(cls, "fused") and params and all(p.is_cuda for p in params):
        kwargs["fused"] = True
    try:
        return cls(params, **kwargs)
    except (TypeError, ValueError) as error:
        raise InputError(f"{KEY}: {target} refused its arguments ({_first_line(error)})") from None


def check_optimizer(spec: Mapping[str, Any] | DictConfig | None) -> None:
    """Refuse a bad ``model.optimizer`` with one line before the model loads: the class must import, be a
    ``torch.optim.Optimizer`` and accept its arguments (it is built once over a one-element parameter)."""
    build_optimizer([torch.nn.Parameter(torch.zeros(1))], spec)
