"""The default spec suite on real model shapes: the cost of every analysis.

Random-weight models of the shipped gpt2 and mamba-130m configs
(:func:`neuronspec.models.shapes.random_model`) are saved as local checkpoints, with the
embedded models' toy-world tokenizer (its ids lie inside the 50k vocabularies), and run
through ``pytest specs/ --models DIR --max-tokens 32768 -n 0`` in a fresh process with a
cold cache and ``NEURONSPEC_FIXTURE_COSTS`` set (:mod:`neuronspec.fixture_costs`). Each
session fixture's own setup is timed: the statistics pass is ``neuron_stats``, every
analysis is a fixture. Reported per analysis: seconds, the growth of the peak resident
memory while it ran, and its ratio to the statistics pass of the same run.

Random weights fail hypotheses and a new model has no snapshots, so the run's test outcomes
are not the point: only a pytest error (exit status 2 to 4) fails the section. ``quick``:
2 layers of each, 4,096 tokens.

Run: ``python -m neuronspec.bench --only suite-real [--quick]``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from neuronspec.bench import Timing, row

SPECS = Path(__file__).resolve().parents[2] / "specs"
MODELS = {"gpt2": "tiny-gpt2", "mamba130m": "tiny-mamba"}  # shape → tokenizer donor
TOKENS, QUICK_TOKENS = 32768, 4096
STATS = "neuron_stats"
OUT_OF_ANALYSES = {"neuronspec_session", "model_id", "model_files", "default_selection"}


def _checkpoint(model_id: str, donor: str, directory: Path, layers: int | None) -> Path:
    from neuronspec.models.shapes import random_model
    from neuronspec.zoo import weights_dir

    model = random_model(model_id, n_layers=layers, fast_scan=False)
    out = directory / f"random-{model_id}"
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(weights_dir(donor) / name, out / name)
    return out


def _suite(checkpoint: Path, cache: Path, costs: Path, tokens: int, pytest_args: list[str]) -> None:
    command = [
        sys.executable, "-m", "pytest", str(SPECS), "-q", "-n", "0", "-p", "no:randomly",
        f"--models={checkpoint}", f"--max-tokens={tokens}", f"--neuronspec-cache={cache}",
        "-rfE", *pytest_args,
    ]  # fmt: skip
    print(" ".join(command[1:]), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NEURONSPEC_FIXTURE_COSTS": str(costs)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode not in (0, 1):  # 1: tests failed, which random weights do
        raise RuntimeError(
            f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-3000:]}"
        )
    lines = result.stdout.strip().splitlines()
    print("\n".join(line for line in lines if line.startswith(("FAILED", "ERROR"))))
    print(lines[-1])


def run(
    quick: bool = False, shapes: list[str] | None = None, pytest_args: list[str] = ()
) -> list[dict]:
    """``shapes``: a subset of :data:`MODELS` (default all); ``pytest_args``: more options
    for the suite's pytest run (e.g. ``--control-seeds=19``, printed with the command)."""
    tokens, layers = (QUICK_TOKENS, 2) if quick else (TOKENS, None)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)
        for model_id, donor in MODELS.items():
            if shapes and model_id not in shapes:
                continue
            checkpoint = _checkpoint(model_id, donor, work_dir, layers)
            costs = work_dir / f"{model_id}.jsonl"
            _suite(checkpoint, work_dir / f"cache-{model_id}", costs, tokens, list(pytest_args))
            lines = [json.loads(line) for line in costs.read_text().splitlines()]
            analyses = [  # the analyses: fixtures that compute (setup of 50 ms or more)
                c for c in lines if c["fixture"] not in OUT_OF_ANALYSES and c["seconds"] >= 0.05
            ]
            stats = next(c for c in analyses if c["fixture"] == STATS)
            stats_name = f"{model_id}-shape: {STATS} (statistics pass), {tokens} tokens"
            total = sum(c["seconds"] for c in analyses)
            for cost in sorted(analyses, key=lambda c: -c["seconds"]):
                name = (
                    stats_name if cost is stats else f"{model_id}-shape: {cost['fixture']}"
                ) + f", peak +{cost['peak_rss_growth'] / 1e9:.2f} GB"
                rows.append(row(name, Timing((cost["seconds"],)), stats_name,
                                Timing((stats["seconds"],))))  # fmt: skip
            rows.append(row(f"{model_id}-shape: all session fixtures", Timing((total,)),
                            stats_name, Timing((stats["seconds"],))))  # fmt: skip
    return rows
