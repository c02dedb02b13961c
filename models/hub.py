"""Loading from the Hugging Face hub or a local directory: a failed load becomes one line saying why."""
from __future__ import annotations

import os
from pathlib import Path

from data.errors import InputError

# what transformers, diffusers and huggingface_hub say when the files are neither cached nor reachable
_NOT_CACHED = ("couldn't connect", "cached files", "offline", "does not appear to have a file",
               "local_files_only", "localentrynotfound", "cannot find the requested files")


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
