"""Start-up fix of the serving environment: vLLM 0.26.0 reads Gemma 4 configs that transformers 5.17 makes.

Installed into every serving environment by `install.sh` beside this file: `setup.sh` puts this
module and `vllm_gemma4_compat.pth` (one `import vllm_gemma4_compat` line) into `.venvs/serve`'s
site-packages, CPU and GPU builds alike, so every Python process of that environment runs it at
start; `bench/gpu/stage_and_run.sh` installs it the same way into `/tmp/site-vllm`, a PYTHONPATH
folder, where Python reads no `.pth` file, so there a `sitecustomize.py` holds the same line.

Why: transformers 5.17 turns Gemma4TextConfig's `global_head_dim` into a per-layer override
(`per_layer_config = {"05": {"head_dim": 512}, ...}`, the heterogeneous-config machinery); it keeps
no `global_head_dim` attribute, and reading `config.head_dim` raises
AmbiguousGlobalPerLayerAttributeError. vLLM 0.26.0 reads `hf_text_config.head_dim` (256) and
`global_head_dim` (512) as plain attributes (model_arch_config_convertor.get_head_size,
models/config.py Gemma4Config, models/gemma4.py), so every Gemma 4 checkpoint fails to start:
"'head_dim' is a per-layer attribute and may vary across layers" (seen on the H100, 2026-11-25).

What: after Gemma4TextConfig.__post_init__, allow the global read (head_dim -> the sliding
layers' 256) and set `global_head_dim` to the full-attention layers' head_dim from the per-layer
overrides, which is what the config said before the conversion. Nothing else changes; the patch
is applied when transformers' gemma4 configuration module is first imported (a meta-path hook), so
processes that never touch Gemma 4 pay nothing.
"""

import importlib.abc
import importlib.machinery
import sys

_TARGET = "transformers.models.gemma4.configuration_gemma4"


def _patch(module) -> None:
    cls = getattr(module, "Gemma4TextConfig", None)
    if cls is None or getattr(cls, "_energy_search_gemma4_compat", False):
        return
    original = cls.__post_init__

    def __post_init__(self, **kwargs):
        global_head_dim = kwargs.get("global_head_dim")
        per_layer = kwargs.get("per_layer_config")
        original(self, **kwargs)
        if global_head_dim is None and isinstance(per_layer, dict):
            dims = [v.get("head_dim") for v in per_layer.values() if isinstance(v, dict) and v.get("head_dim")]
            global_head_dim = max(dims) if dims else None
        if global_head_dim is None:
            spec = self.__dict__.get("_heterogeneity_spec")
            layers = getattr(spec, "per_layer_overrides", None) if spec is not None else None
            if isinstance(layers, dict):
                dims = [v.get("head_dim") for v in layers.values() if isinstance(v, dict) and v.get("head_dim")]
                global_head_dim = max(dims) if dims else None
        self.__dict__["allow_global_per_layer_attribute_access"] = True
        if global_head_dim is not None:
            self.__dict__["global_head_dim"] = int(global_head_dim)

    cls.__post_init__ = __post_init__
    cls._energy_search_gemma4_compat = True


class Gemma4ConfigHook(importlib.abc.MetaPathFinder):
    """Patches Gemma4TextConfig when its module is first imported (the only module it looks at)."""

    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def patched_exec(module):
            exec_module(module)
            _patch(module)

        loader.exec_module = patched_exec
        return spec


def installed() -> bool:
    """Whether this process carries the fix: the hook is on sys.meta_path, or the module is patched."""
    module = sys.modules.get(_TARGET)
    return any(isinstance(h, Gemma4ConfigHook) for h in sys.meta_path) or bool(
        module is not None and getattr(getattr(module, "Gemma4TextConfig", None), "_energy_search_gemma4_compat", False))


if _TARGET in sys.modules:
    _patch(sys.modules[_TARGET])
else:
    sys.meta_path.insert(0, Gemma4ConfigHook())
