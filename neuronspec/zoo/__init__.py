"""The embedded default: tiny GPT-2 and Mamba models trained on the toy world, shipped in HF format.

Train with ``python -m neuronspec.zoo train tiny-gpt2``; measure with
``python -m neuronspec.zoo eval tiny-gpt2``. Weights live in ``neuronspec/zoo/weights/<name>/``.
"""

from __future__ import annotations

from pathlib import Path

from neuronspec.errors import UnknownModelError

WEIGHTS = Path(__file__).parent / "weights"
EMBEDDED_MODELS = ("tiny-gpt2", "tiny-mamba")


def weights_dir(name: str) -> Path:
    """The directory of embedded model ``name`` (``AutoModelForCausalLM.from_pretrained``-able)."""
    if name not in EMBEDDED_MODELS:
        raise UnknownModelError(
            f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED_MODELS)}"
        )
    return WEIGHTS / name


__all__ = ["EMBEDDED_MODELS", "weights_dir"]
