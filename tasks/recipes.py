"""Recipes: how an optimised model version is rebuilt from its stored fp32 weights at load time.

An optimised version is a normal model directory (config.json + model.safetensors + tokenizer
files, plus classifier.json or embedder.json) with one more file, `recipe.json`:

    {
      "format": "tensorq-recipe", "format_version": 1,
      "parent": {"name": "sentiment", "version": 3},
      "steps": [
        {"method": "distill", "options": {...}, "at_load": false},
        {"method": "quantize-int8", "options": {...}, "at_load": true,
         "resolved": {"fp32_modules": ["encoder.layer.0.output.dense"], "per_channel": true}}
      ],
      "lineage": [{"model": "sentiment", "version": 3, "method": "distill", ...}, ...]
    }

Steps that change the architecture (distill: fewer layers; prune-ffn: a smaller FFN) are already in
the weights, and config.json says so (`num_hidden_layers`, `intermediate_size`), so a standard
`BertConfig`/`BertModel` loads the safetensors as they are. Steps with `at_load: true`
(quantize-int8, quantize-fp16, quantize-bf16) are applied by `apply_recipe` every time the version
is loaded: a dynamically quantised module cannot be saved without pickle, and quantising MiniLM
again takes well under a second. Nothing here is ever unpickled.

Devices: int8 (torch dynamic quantisation) runs on CPU only; fp16/bf16 are meant for CUDA.
`apply_recipe` is strict and raises `UnsupportedRecipe` for a recipe the device cannot run. The
loaders (`serving_device`) choose a fallback instead: an int8 recipe on a CUDA worker is served on
the CPU, and a half-precision recipe on a CPU worker runs the (half-precision) weights in fp32.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.context import JobError
from tensorq.core.sealed_files import PLAIN, Files

if TYPE_CHECKING:
    import torch

RECIPE_FILE = "recipe.json"
FORMAT = "tensorq-recipe"
FORMAT_VERSION = 1

Method = Literal["quantize-int8", "quantize-fp16", "quantize-bf16", "distill", "prune-ffn"]
METHODS: tuple[str, ...] = ("quantize-int8", "quantize-fp16", "quantize-bf16", "distill", "prune-ffn")
LOAD_TIME_METHODS = frozenset({"quantize-int8", "quantize-fp16", "quantize-bf16"})


class UnsupportedRecipe(JobError):
    """A recipe this device (or this code) cannot run: int8 on CUDA, fp16/bf16 on CPU, a new step."""

    def __init__(self, message: str) -> None:
        super().__init__("UnsupportedRecipe", message)


class RecipeFormatError(ValueError):
    """A recipe.json that is not one this code wrote."""


class ParentRef(BaseModel):
    name: str
    version: int


class Step(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Method
    options: dict[str, Any] = Field(default_factory=dict)
    at_load: bool = False
    # What the optimisation chose (e.g. which Linear layers stay fp32), so that loading repeats it.
    resolved: dict[str, Any] = Field(default_factory=dict)


class LineageEntry(BaseModel):
    model: str
    version: int
    method: Method
    options: dict[str, Any] = Field(default_factory=dict)


class Recipe(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: Literal["tensorq-recipe"] = "tensorq-recipe"
    format_version: int = FORMAT_VERSION
    parent: ParentRef | None = None
    steps: list[Step] = Field(default_factory=list)
    lineage: list[LineageEntry] = Field(default_factory=list)

    def load_steps(self) -> list[Step]:
        return [s for s in self.steps if s.at_load]

    def weight_steps(self) -> list[Step]:
        return [s for s in self.steps if not s.at_load]


def read_recipe(path: Path | str, files: Files = PLAIN) -> Recipe | None:
    """The recipe in model directory `path`, or None when it has none (a plain fp32 version)."""
    file = Path(path) / RECIPE_FILE
    if not files.exists(file):
        return None
    try:
        recipe = Recipe.model_validate(json.loads(files.read(file)))
    except (ValueError, ValidationError) as exc:
        raise RecipeFormatError(f"bad {RECIPE_FILE} in {path}: {exc}") from exc
    if recipe.format_version != FORMAT_VERSION:
        raise RecipeFormatError(f"{path}: recipe format v{recipe.format_version}, this code reads v1")
    return recipe


def recipe_bytes(recipe: Recipe) -> bytes:
    """The content of a model directory's RECIPE_FILE."""
    return (recipe.model_dump_json(indent=2) + "\n").encode()


# --- devices -----------------------------------------------------------------------------------


def _device_type(device: str) -> str:
    return device.split(":", 1)[0]


def check_device(recipe: Recipe | None, device: str) -> None:
    """Raise UnsupportedRecipe when `device` cannot run `recipe` as written."""
    if recipe is None:
        return
    kind = _device_type(device)
    for step in recipe.load_steps():
        if step.method == "quantize-int8" and kind != "cpu":
            raise UnsupportedRecipe(f"int8 dynamic quantisation runs on CPU only, not on {device!r}")
        if step.method in ("quantize-fp16", "quantize-bf16") and kind != "cuda":
            raise UnsupportedRecipe(f"{step.method} is for CUDA devices, not {device!r}")


def serving_device(recipe: Recipe | None, device: str) -> tuple[str, bool]:
    """(device to load on, whether to skip half-precision casts): the loaders' fallback policy.

    int8 on a non-CPU worker -> served on "cpu". fp16/bf16 on a non-CUDA worker -> the stored
    half-precision weights are computed in fp32 on that device (same values, no speed-up)."""
    if recipe is None:
        return device, False
    methods = {s.method for s in recipe.load_steps()}
    if "quantize-int8" in methods:
        return "cpu", False
    if methods & {"quantize-fp16", "quantize-bf16"} and _device_type(device) != "cuda":
        return device, True
    return device, False


# --- applying -----------------------------------------------------------------------------------


def quantize_int8_module(
    module: torch.nn.Module, fp32_modules: Iterable[str] = (), per_channel: bool = True
) -> torch.nn.Module:
    """Dynamic int8 of every nn.Linear in `module` except those named in `fp32_modules` (a copy)."""
    import torch
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    keep = set(fp32_modules)
    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    spec = {
        name: qconfig
        for name, m in module.named_modules()
        if isinstance(m, torch.nn.Linear) and name not in keep
    }
    # Only the children holding a Linear to quantise are copied; the others (the 47 MB word
    # embeddings) are shared with `module`, which is left as it was.
    shell = copy.copy(module)
    shell._modules = dict(module._modules)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's "migrate to torchao" deprecation notices
        for name, child in module.named_children():
            sub = {k: q for k, q in spec.items() if k == name or k.startswith(name + ".")}
            if sub:
                holder = torch.nn.ModuleDict({name: child})
                shell._modules[name] = quantize_dynamic(holder, sub, dtype=torch.qint8, inplace=False)[name]
    return shell


HALF_DTYPES = {"quantize-fp16": "float16", "quantize-bf16": "bfloat16"}


def apply_recipe(model: Any, recipe: Recipe | None, device: str, *, skip_half: bool = False) -> Any:
    """Apply the load-time steps of `recipe` to `model` (a TextClassifier, an Encoder or a bare
    BertModel) and return it. Strict: a step the device cannot run raises UnsupportedRecipe, except
    half-precision casts when `skip_half` (the loaders' CPU fallback)."""
    import torch

    if recipe is None or not recipe.load_steps():
        return model
    int8_off_cpu = _device_type(device) != "cpu" and any(
        s.method == "quantize-int8" for s in recipe.load_steps()
    )
    if not skip_half or int8_off_cpu:
        check_device(recipe, device)
    for step in recipe.load_steps():
        if step.method == "quantize-int8":
            fp32 = step.resolved.get("fp32_modules", [])
            per_channel = bool(step.resolved.get("per_channel", step.options.get("per_channel", True)))
            _set_bert(model, quantize_int8_module(_bert(model), fp32, per_channel))
        elif step.method in HALF_DTYPES:
            if skip_half:
                continue
            dtype = getattr(torch, HALF_DTYPES[step.method])
            cast_half(model, dtype)
        else:  # pragma: no cover - Step.method is a Literal; a new at-load method needs code here
            raise UnsupportedRecipe(f"no load-time implementation of {step.method!r}")
    return model


def cast_half(model: Any, dtype: torch.dtype) -> None:
    """Cast a classifier's encoder and head (or an encoder) to `dtype`, in place."""
    _bert(model).to(dtype)
    head = getattr(model, "head", None)
    if head is not None:
        head.to(dtype)


def _bert(model: Any) -> torch.nn.Module:
    import torch

    if isinstance(model, torch.nn.Module):
        return model
    inner = getattr(model, "encoder", None)  # TextClassifier
    if isinstance(inner, torch.nn.Module):
        return inner
    inner = getattr(model, "model", None)  # minilm.Encoder
    if isinstance(inner, torch.nn.Module):
        return inner
    raise TypeError(f"no encoder module in {type(model).__name__}")


def _set_bert(model: Any, module: torch.nn.Module) -> None:
    import torch

    if isinstance(model, torch.nn.Module):
        # quantize_dynamic(inplace=False) returned a copy; copy its children back into `model`.
        for name, child in module.named_children():
            setattr(model, name, child)
    elif isinstance(getattr(model, "encoder", None), torch.nn.Module):
        model.encoder = module
    else:
        model.model = module


# --- sizes -------------------------------------------------------------------------------------


def _tensor_stats(value: Any) -> tuple[int, int]:
    """(bytes, elements) of a state_dict value: a tensor, a quantised tensor or a packed tuple."""
    import torch

    if isinstance(value, tuple | list):
        total_b = total_n = 0
        for item in value:
            b, n = _tensor_stats(item)
            total_b, total_n = total_b + b, total_n + n
        return total_b, total_n
    if not isinstance(value, torch.Tensor):
        return 0, 0  # e.g. the packed params' dtype entry
    if value.is_quantized:
        size = value.numel() * value.element_size()  # 1 byte per qint8 element
        if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            scales, zeros = value.q_per_channel_scales(), value.q_per_channel_zero_points()
            size += scales.numel() * scales.element_size() + zeros.numel() * zeros.element_size()
        else:
            size += 16  # one float64 scale and one int64 zero point
        return size, value.numel()
    return value.numel() * value.element_size(), value.numel()


def _modules_of(model: Any) -> list[torch.nn.Module]:
    import torch

    if isinstance(model, torch.nn.Module):
        return [model]
    mods = [_bert(model)]
    head = getattr(model, "head", None)
    if isinstance(head, torch.nn.Module):
        mods.append(head)
    return mods


def model_nbytes(model: Any) -> int:
    """Bytes of every tensor the model holds, packed int8 weights (not in parameters()) included."""
    return sum(_tensor_stats(list(m.state_dict().values()))[0] for m in _modules_of(model))


def parameter_count(model: Any) -> int:
    """Weights and biases, quantised ones included (one count per int8 element); buffers such as
    position ids and quantisation scales are not counted."""
    import torch

    count = 0
    for module in _modules_of(model):
        count += sum(p.numel() for p in module.parameters())
        for m in module.modules():
            packed = getattr(m, "_packed_params", None)
            if packed is not None and hasattr(packed, "_weight_bias"):
                weight, bias = packed._weight_bias()
                count += weight.numel() + (bias.numel() if isinstance(bias, torch.Tensor) else 0)
    return count
