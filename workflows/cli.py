"""What both entry scripts share: the config directory, checks of the command line before Hydra runs
anything, the task dispatch, and one-line reports of user errors."""
from __future__ import annotations

import difflib
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

import lightning as L
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, HydraException, InstantiationException
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

import workflows.config_schema  # noqa: F401 - registers the config schema before Hydra composes
from common.errors import InputError
from workflows.config_checks import check_train_config

log = logging.getLogger("train")
ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "configs"
# ${repo:assets/toy/sd} -> an absolute path inside this checkout, whatever the working directory.
OmegaConf.register_new_resolver("repo", lambda relative: str(ROOT / relative), replace=True)


def unknown_group_choice(argv: list[str], config_dir: Path = CONFIG_DIR) -> str | None:
    """Check ``group=option`` overrides against the YAML files in ``configs/<group>/``.

    Hydra reports an unknown option with its search path and more; this gives one line. Skipped when
    the user adds config directories (``hydra.searchpath``), where options may live elsewhere.
    """
    if any("hydra.searchpath" in arg for arg in argv):
        return None
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        if not sep or arg.startswith("-") or "." in key or "/" in key or not (config_dir / key).is_dir():
            continue
        options = sorted(p.stem for p in (config_dir / key).glob("*.yaml"))
        for choice in value.split(","):  # multirun sweeps: objective=dpo,sft
            if choice not in options and choice != "null":
                return f"unknown {key} {choice!r}; available: {', '.join(options)}"
    return None


def run_task(cfg: DictConfig) -> dict[str, float]:
    """Run the task ``cfg.task.runner`` (fit, merge, ...) and return its final metrics."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise InputError(f"config key {missing[0]} must be set (e.g. {missing[0]}=...); unset: {', '.join(missing)}")
    started = time.perf_counter()
    check_train_config(cfg)  # before anything loads: ranges, paths, output directories, the checkpoint to resume
    log.info("config checked in %.2f s", time.perf_counter() - started)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # Lightning's own line would go to stderr
    log.info("seed %d", cfg.seed)
    return get_method(cfg.task.runner)(cfg)


def explain(err: BaseException) -> str | None:
    """A one-line message for errors caused by user input, or None for genuine bugs."""
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    if isinstance(err, InputError):
        return str(err)
    if isinstance(err, OmegaConfBaseException):
        key = getattr(err, "full_key", None)
        first = str(err).strip().splitlines()[0]
        return f"config key {key}: {first}" if key else f"config: {first}"
    if isinstance(err, InstantiationException):
        return str(err).strip().splitlines()[0]
    return None


def run_reporting_user_errors(job: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run a command's ``job``: user errors become one line on stderr and exit status 2; bugs keep their traceback."""
    try:
        return job(cfg)
    except Exception as err:  # noqa: BLE001
        message = explain(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def unknown_config_key(argv: list[str], config_name: str) -> str | None:
    """Compose the config with the command line's overrides (nothing runs) to catch a mistyped key, and
    suggest the closest existing one. Hydra's own report of this spans several lines."""
    if any(arg in ("-m", "--multirun") for arg in argv):
        return None
    overrides = [a for a in argv if "=" in a and not a.startswith("-") and not a.lstrip("+~").startswith("hydra")]
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            compose(config_name, overrides=overrides)
        return None
    except ConfigCompositionException as error:
        cause = error.__cause__
    except HydraException:
        return None  # e.g. override syntax: Hydra's own message says what to write
    key = getattr(cause, "full_key", None)
    if isinstance(cause, ValidationError) and key:  # a value of the wrong type for the schema
        found = str(cause).strip().splitlines()[0]
        return f"config key {key}: {found} (workflows/config_schema.py has the type of every key)"
    if not isinstance(cause, (ConfigAttributeError, ConfigKeyError)) or not key:
        return None  # not a key typo: Hydra reports it when it composes
    parent, _, leaf = key.rpartition(".")
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        base = compose(config_name, overrides=[o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key])
    node = OmegaConf.select(base, parent) if parent else base
    options = [str(o) for o in node.keys()] if isinstance(node, DictConfig) else []
    if not parent:
        options += [d.name for d in CONFIG_DIR.iterdir() if d.is_dir()]
    match = difflib.get_close_matches(leaf, options, n=1)
    hint = f" (did you mean {parent + '.' if parent else ''}{match[0]}?)" if match else f"; to add it, write +{key}=..."
    return f"unknown config key {key}{hint}"


def check_group_choices(argv: list[str], config_name: str = "train") -> None:
    """Stop with one line on an unknown ``group=option`` or a mistyped key before Hydra runs anything."""
    problem = unknown_group_choice(argv) or unknown_config_key(argv, config_name)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
