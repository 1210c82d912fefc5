"""neuronspec: reproducible findings about the neurons of language models, as pytest specs.

The public API is gathered here as it grows (see README, "Writing a spec").
"""

from __future__ import annotations

__version__ = "0.1.0"
