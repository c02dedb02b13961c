"""Loading from the Hugging Face hub or a local directory: a failed load becomes one line saying why."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from huggingface_hub import try_to_load_from_cache

from common.errors import InputError

# what transformers, diffusers and huggingface_hub say when the files are neither cached nor reachable
# ("does not appear to have a file" is also what a reachable hub says of a missing file: judged by hub_offline())
_NOT_CACHED = ("couldn't connect", "cached files", "offline", "local_files_only", "localentrynotfound",
               "cannot find the requested files")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def load_error(key: str, name: str | Path, error: BaseException, local_files_only: bool = False) -> InputError:
    """The one-line error for ``key=name`` that failed to load with ``error``: a hub id that is not in the
    local cache while the hub is out of reach says so and how to get it; anything else keeps the loader's
    first line."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    local = Path(str(name)).expanduser().exists()
    if not local and (local_files_only or hub_offline() or any(s in text.lower() for s in _NOT_CACHED)):
        why = ("local_files_only is set" if local_files_only else "HF_HUB_OFFLINE=1" if hub_offline()
               else "the hub cannot be reached")
        return InputError(f"{key}={name}: not in the local Hugging Face cache ({why}); download it first with "
                          f"`hf download {name}`, or set {key} to a local directory")
    return InputError(f"{key}={name}: cannot load it ({first})")


def pretrained_file(pretrained: str, name: str, revision: str | None = None) -> Path | None:
    """``name`` (e.g. ``unet/config.json``) of a local pipeline directory or of a hub id already in the local
    cache, without downloading; ``None`` when neither has it."""
    local = Path(pretrained).expanduser() / name
    if local.is_file():
        return local
    try:
        found = try_to_load_from_cache(pretrained, name, revision=revision)
    except Exception:  # noqa: BLE001 - not a valid repo id: the loader will say so
        return None
    return Path(found) if isinstance(found, str) else None


def unet_config_digest(pretrained: str, revision: str | None = None, denoiser: str = "unet") -> str | None:
    """A digest of the denoiser's ``config.json`` (its architecture; ``denoiser`` is the family's subfolder), from
    a local directory or the hub cache."""
    file = pretrained_file(pretrained, f"{denoiser}/config.json", revision)
    if file is None:
        return None
    config = {k: v for k, v in json.loads(file.read_text()).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
