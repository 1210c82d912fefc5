"""Errors that say what was wrong and what to do.

Every error the library raises for bad input is a :class:`NeuronSpecError`, so the
pytest plugin can show its one-line message instead of a traceback.
"""

from __future__ import annotations


class NeuronSpecError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class UnknownModelError(NeuronSpecError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ModelNotAvailableError(NeuronSpecError):
    """A known model whose weights are not on this machine (offline, not in the HF cache)."""


class LayerOutOfRangeError(NeuronSpecError, IndexError):
    pass


class CheckpointError(NeuronSpecError):
    """A model directory that is not a usable checkpoint (no or a damaged config.json)."""


class UnknownSiteError(NeuronSpecError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class CorpusError(NeuronSpecError, ValueError):
    """Empty, too short, or otherwise unusable corpus."""


class TooFewTokensError(NeuronSpecError, ValueError):
    """A finding was asked for on fewer tokens than the spec requires."""


class CacheCorruptError(NeuronSpecError):
    """A cache entry failed validation; callers recompute it."""


class CountTableError(NeuronSpecError, ValueError):
    """Inconsistent count tables given to an analysis (mismatched lengths, ids out of range)."""
