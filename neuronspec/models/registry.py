"""Model registry: short ids → HF checkpoints, offline loading, and a site adapter per family.

``load_model("mamba130m")`` loads ``state-spaces/mamba-130m-hf`` with the normal
``from_pretrained`` code, but only from what is on this machine (a local directory or
the HF cache); nothing is downloaded. A known model that is not available raises
:class:`ModelNotAvailableError` with instructions, which the pytest plugin turns into
a skip.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from neuronspec.data.windows import TokenizerRef
from neuronspec.errors import (
    CheckpointError,
    ModelNotAvailableError,
    NeuronSpecError,
    UnknownModelError,
)
from neuronspec.models.adapters import SiteAdapter, adapter_for

# Short id → HF repo. Families are read from the checkpoint's config.
HUB_MODELS: dict[str, str] = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "mamba130m": "state-spaces/mamba-130m-hf",
    "mamba370m": "state-spaces/mamba-370m-hf",
    "mamba790m": "state-spaces/mamba-790m-hf",
    "mamba1.4b": "state-spaces/mamba-1.4b-hf",
    "mamba2.8b": "state-spaces/mamba-2.8b-hf",
}
# The embedded default, shipped in the repo (see neuronspec/zoo).
EMBEDDED_MODELS: tuple[str, ...] = ("tiny-gpt2", "tiny-mamba")

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def known_model_ids() -> list[str]:
    return [*EMBEDDED_MODELS, *HUB_MODELS]


@dataclass(frozen=True)
class ModelSource:
    """Where a model id resolves to: a local directory, or a hub repo to read from the HF cache."""

    model_id: str
    local_dir: Path | None = None
    repo: str | None = None

    @property
    def description(self) -> str:
        return str(self.local_dir) if self.local_dir is not None else f"{self.repo} (HF cache)"


def resolve(model_id: str) -> ModelSource:
    """Map a short id, an HF repo name or a local directory to a :class:`ModelSource`."""
    if model_id in EMBEDDED_MODELS:
        from neuronspec.zoo import weights_dir

        return ModelSource(model_id, local_dir=weights_dir(model_id))
    if model_id in HUB_MODELS:
        return ModelSource(model_id, repo=HUB_MODELS[model_id])
    path = Path(model_id).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            missing = "config.json"
        elif not any((path / name).is_file() for name in _WEIGHT_FILES):
            missing = f"weights ({' / '.join(_WEIGHT_FILES)})"
        else:
            return ModelSource(model_id, local_dir=path.resolve())
        raise CheckpointError(
            f"{path.resolve()} is not a checkpoint directory: it has no {missing}; pass "
            "a directory written by save_pretrained() (config.json, weights, tokenizer)"
        )
    if model_id in HUB_MODELS.values():
        return ModelSource(model_id, repo=model_id)
    known = known_model_ids()
    if os.sep in model_id or model_id.startswith((".", "~")):
        raise UnknownModelError(
            f"no directory {model_id!r} (from --models); pass an existing checkpoint "
            f"directory or a model id: {', '.join(known)}"
        )
    close = difflib.get_close_matches(model_id, known, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise UnknownModelError(
        f"unknown model {model_id!r}; {hint}known: {', '.join(known)}, "
        "or a local directory holding an HF checkpoint and tokenizer"
    )


def read_config(directory: Path) -> dict:
    """The checkpoint's config.json as a dict; :class:`CheckpointError` naming the file if
    it is damaged (not JSON, not an object); FileNotFoundError if absent."""
    path = directory / "config.json"
    text = path.read_bytes()
    try:
        config = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = (
            f"{error.msg} at line {error.lineno} column {error.colno}"
            if isinstance(error, json.JSONDecodeError)
            else "not UTF-8"
        )
        raise CheckpointError(
            f"{path} is not valid JSON ({reason}); the checkpoint is damaged: write it again "
            "with save_pretrained() or download the model again"
        ) from None
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{path} holds a JSON {type(config).__name__}, not an object; the checkpoint is "
            "damaged: write it again with save_pretrained() or download the model again"
        )
    return config


def checkpoint_config(model_id: str) -> dict | None:
    """The checkpoint's config.json without loading weights (local directory or HF cache);
    None if it is not on this machine. A damaged config.json raises :class:`CheckpointError`
    naming the file."""
    source = resolve(model_id)
    directory = source.local_dir
    if directory is None:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(source.repo, "config.json")
        if not isinstance(found, str):
            return None
        directory = Path(found).parent
    try:
        return read_config(directory)
    except FileNotFoundError:
        return None


def checkpoint_layers(model_id: str) -> int | None:
    """The layer count in the checkpoint's config.json; None if it is not on this machine."""
    config = checkpoint_config(model_id) or {}
    for key in ("n_layer", "num_hidden_layers"):
        if key in config:
            return int(config[key])
    return None


def _local_files(source: ModelSource) -> Path:
    """The directory holding the checkpoint; raises ModelNotAvailableError if it is not here."""
    if source.local_dir is not None:
        if not (source.local_dir / "config.json").is_file():
            raise ModelNotAvailableError(
                f"model {source.model_id!r}: {source.local_dir} has no config.json; "
                "point --models at a directory saved with save_pretrained()"
            )
        directory = source.local_dir
    else:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(source.repo, "config.json")
        if not isinstance(config, str):
            raise ModelNotAvailableError(
                f"model {source.model_id!r} ({source.repo}) is not available offline; on a "
                f"machine with network run `hf download {source.repo}` and copy the HF cache "
                "(~/.cache/huggingface/hub) here, or pass a local checkpoint directory to --models"
            )
        directory = Path(config).parent
    if not any((directory / name).is_file() for name in _WEIGHT_FILES):
        raise ModelNotAvailableError(
            f"model {source.model_id!r}: no weights ({' / '.join(_WEIGHT_FILES)}) in {directory}; "
            "the checkpoint is incomplete: download it again"
        )
    return directory


def is_available(model_id: str) -> bool:
    try:
        _local_files(resolve(model_id))
    except ModelNotAvailableError:
        return False
    return True


def weights_fingerprint(directory: Path) -> str:
    """sha256 over the checkpoint's weight and config files (content, not paths or mtimes)."""
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.suffix in {".safetensors", ".bin", ".json"} and path.is_file():
            digest.update(path.name.encode())
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
    return digest.hexdigest()


_NOT_TOKENIZER_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".md"}


def tokenizer_files_fingerprint(directory: Path) -> str:
    """sha256 over the files a tokenizer can be built from (every file of the checkpoint
    but weights and docs: tokenizer.json, vocab, merges, configs), with the versions of
    transformers and tokenizers that build it. Cheap: no tokenizer is loaded."""
    digest = hashlib.sha256()
    for package in ("transformers", "tokenizers"):
        digest.update(f"{package} {metadata.version(package)}|".encode())
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.suffix not in _NOT_TOKENIZER_SUFFIXES:
            digest.update(f"{path.name}|{path.stat().st_size}|".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


@dataclass
class LoadedModel:
    """A model ready for analysis: HF model in eval mode, tokenizer, and its site adapter."""

    model_id: str
    model: torch.nn.Module
    tokenizer: object
    adapter: SiteAdapter
    fingerprint: str
    source: str
    extra: dict = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.adapter.family

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise NeuronSpecError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(device)


_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def pick_dtype(dtype: str) -> torch.dtype:
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise NeuronSpecError(
            f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}"
        ) from None


@dataclass
class ModelFiles:
    """A checkpoint found on disk, not yet instantiated: what cache keys and tokenisation
    need (the weights' hash, the tokenizer), without ``from_pretrained`` of the model.

    The tokenizer is loaded on first use: a rerun whose token windows are cached never
    imports transformers for it (see :class:`~neuronspec.data.windows.TokenizerRef`).
    """

    model_id: str
    directory: Path
    source: str
    fingerprint: str

    @functools.cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.directory, local_files_only=True)

    @functools.cached_property
    def tokenizer_ref(self) -> TokenizerRef:
        """The tokenizer by the fingerprint of its files, loaded only when it is needed."""
        return TokenizerRef(
            fingerprint=tokenizer_files_fingerprint(self.directory),
            load=lambda: self.tokenizer,
        )

    @property
    def model_type(self) -> str:
        """``model_type`` of the checkpoint's config.json (e.g. "gpt2", "mamba")."""
        return str(read_config(self.directory).get("model_type", "unknown"))


def open_model(model_id: str) -> ModelFiles:
    """Find ``model_id``'s checkpoint offline and hash its weights (the tokenizer is loaded
    on first use of :attr:`ModelFiles.tokenizer`).

    Raises :class:`UnknownModelError` or :class:`ModelNotAvailableError` with what to do.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    source = resolve(model_id)
    directory = _local_files(source)
    read_config(directory)  # a damaged config.json is an error naming the file, early
    return ModelFiles(
        model_id=model_id,
        directory=directory,
        source=source.description,
        fingerprint=weights_fingerprint(directory),
    )


def load_model(
    model_id: str,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    fast_scan: bool = True,
    files: ModelFiles | None = None,
) -> LoadedModel:
    """Load ``model_id`` offline with ``from_pretrained`` and wrap it with its site adapter.

    ``fast_scan`` switches Mamba models to neuronspec's exact fast selective scan
    (see :mod:`neuronspec.models.scan`); it changes speed, not results. ``files``: the
    checkpoint as already opened by :func:`open_model` (opened here otherwise).
    """
    from transformers import AutoModelForCausalLM

    files = files if files is not None else open_model(model_id)
    model = AutoModelForCausalLM.from_pretrained(
        files.directory, dtype=pick_dtype(dtype), local_files_only=True
    )
    model.to(pick_device(device)).eval()
    adapter = adapter_for(model)
    if adapter.family == "mamba" and fast_scan:
        from neuronspec.models.scan import use_fast_scan

        use_fast_scan(model)
    return LoadedModel(
        model_id=model_id,
        model=model,
        tokenizer=files.tokenizer,
        adapter=adapter,
        fingerprint=files.fingerprint,
        source=files.source,
    )
