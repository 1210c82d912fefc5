"""Root conftest. The neuronspec pytest plugin is loaded through its ``pytest11`` entry point
(``pip install -e .``); this makes it load from a plain checkout too."""

import importlib.metadata

if not any(ep.name == "neuronspec" for ep in importlib.metadata.entry_points(group="pytest11")):
    pytest_plugins = ["neuronspec.plugin"]
