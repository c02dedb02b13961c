"""Model families (``base.ModelFamily``): one module each, chosen by ``model.family`` or by the checkpoint's
``model_index.json`` ``_class_name``. A new family is a module that registers an instance and is imported here."""
from __future__ import annotations

import json
from pathlib import Path

from diffusers import DiffusionPipeline

from common.errors import InputError
from models.families.base import DEFAULT_FAMILY, FAMILIES, Components, ImageGeometry, ModelFamily
from models.families.flux import FLUX_FAMILY, FluxFamily
from models.families.sd import SD_FAMILY, SDFamily
from models.families.sd3 import SD3_FAMILY, SD3Family
from models.families.sdxl import SDXL_FAMILY, SDXLFamily

__all__ = ["FAMILIES", "FLUX_FAMILY", "Components", "FluxFamily", "ImageGeometry", "ModelFamily", "SD3Family", "SD3_FAMILY", "SDFamily",
           "SDXLFamily", "SD_FAMILY", "SDXL_FAMILY", "family_for", "family_named"]


def family_named(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise InputError(f"model.family: expected auto or one of {', '.join(sorted(FAMILIES))}, got {name!r}")
    return FAMILIES[name]


def pipeline_class(pretrained: str, revision: str | None = None, local_files_only: bool = False) -> str | None:
    """``_class_name`` of a checkpoint's ``model_index.json``: a local directory's, or the hub's (a small
    download); ``None`` when there is none to read (the SD loader then reports what is missing)."""
    local = Path(pretrained).expanduser()
    if local.exists():
        index = local / "model_index.json"
        return json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    try:
        config = DiffusionPipeline.load_config(pretrained, revision=revision, local_files_only=local_files_only)
    except Exception:  # noqa: BLE001 - not reachable or not a pipeline: the loader's own error says which
        return None
    return config.get("_class_name")


def family_for(pretrained: str, name: str | None = "auto", revision: str | None = None,
               local_files_only: bool = False) -> ModelFamily:
    """The family ``name`` (``model.family``), or with ``auto`` the one whose pipeline class the checkpoint names."""
    if name and name != "auto":
        return family_named(name)
    found = pipeline_class(pretrained, revision, local_files_only)
    if found is None:
        return FAMILIES[DEFAULT_FAMILY]
    for family in FAMILIES.values():
        if found in family.pipeline_classes:
            return family
    raise InputError(f"model.pretrained={pretrained}: its model_index.json names {found}, which no model family "
                     f"trains (known: {', '.join(sorted(FAMILIES))}); set model.family to load it as one of them")
