"""Model families: one module per architecture, picked by a checkpoint's ``architectures``.

The floor, recipes, the compression worker and feasibility ask ``family_for(config)`` instead of
knowing an architecture. Adding a family is one module with a ``ModelFamily`` subclass, listed in
FAMILIES, and its test.
"""

from __future__ import annotations

import json
from pathlib import Path

from search.models._base import (DecoderLayer, LinearShape, ModelFamily, ModuleNames, UnknownModelFamily,
                                 text_config)
from search.models.gemma3 import Gemma3
from search.models.gemma4 import Gemma4
from search.models.llama import Llama

GEMMA4 = Gemma4()
LLAMA = Llama()
GEMMA3 = Gemma3()
FAMILIES: tuple[ModelFamily, ...] = (GEMMA4, LLAMA, GEMMA3)
# Hand-written config dicts (tests, benches) that name no architecture describe the tool's default
# model, the toy Gemma 4.
DEFAULT = GEMMA4

__all__ = ["DecoderLayer", "LinearShape", "ModelFamily", "ModuleNames", "UnknownModelFamily", "FAMILIES",
           "GEMMA4", "LLAMA", "GEMMA3", "DEFAULT", "family_for", "family_of", "text_config"]


def family_for(config: dict) -> ModelFamily:
    """The family of a Hugging Face config dict: by ``architectures``, else by ``model_type``."""
    names = list(config.get("architectures") or [])
    for family in FAMILIES:
        if set(names) & set(family.architectures):
            return family
    model_type = config.get("model_type") or text_config(config).get("model_type")
    for family in FAMILIES:
        if not names and model_type in family.model_types:
            return family
    if names or model_type:
        raise UnknownModelFamily(names[0] if names else f"model_type {model_type}",
                                 [a for f in FAMILIES for a in f.architectures])
    return DEFAULT


def family_of(checkpoint: Path) -> ModelFamily:
    """The family of a checkpoint folder (its config.json)."""
    return family_for(json.loads((Path(checkpoint) / "config.json").read_text()))
