"""``python -m neuronspec collect``: fill the statistics cache, on one process or many
(:mod:`neuronspec.capture.collect`).

Takes every run option of ``pytest specs/`` (the one table, :mod:`neuronspec.options`), so
its entries have the keys a later ``pytest specs/`` with the same options looks up. Options
the statistics do not depend on (``--layers``, ``--top-k``, …) are accepted and do not
change the entry.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch.distributed as dist

from neuronspec.capture.collect import Group, collect_model, init_group
from neuronspec.errors import NeuronSpecError
from neuronspec.options import add_options
from neuronspec.session import RunConfig, SpecSession


def parser() -> argparse.ArgumentParser:
    made = argparse.ArgumentParser(
        prog="python -m neuronspec collect",
        description="Fill the statistics cache for --models on --corpus (the options of "
        "`pytest specs/`), on one process or data-parallel under torchrun.",
    )
    add_options(made.add_argument, run_only=True)
    return made


def parse_run_config(argv: list[str]) -> RunConfig:
    """The :class:`RunConfig` a ``pytest specs/`` run with these options would use; raises
    :class:`NeuronSpecError` naming a bad option value, an unknown model or a missing layer."""
    run = RunConfig.from_options(parser().parse_args(argv))
    run.check_models()
    return run


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        run = parse_run_config(list(sys.argv[1:] if argv is None else argv))
    except NeuronSpecError as error:
        print(f"neuronspec collect: {error}", file=sys.stderr)
        return 2
    if run.cache_dir is None:
        print("neuronspec collect: --neuronspec-cache none leaves nothing to fill", file=sys.stderr)
        return 2
    group, created = init_group(run.device)
    if group.comm_device.type == "cuda":
        run = dataclasses.replace(run, device=str(group.comm_device))
    session = SpecSession(run)
    try:
        for model_id in run.models:
            summary = collect_model(session, model_id, group)
            if group.rank == 0:
                _report(summary, group)
            session.release_model(model_id)  # one model in memory at a time
        # Every rank leaves the last collective before any rank tears its connections down:
        # a peer that destroys the group while another still completes a collective on it can
        # abort that rank at exit (gloo's threads, SIGABRT).
        dist.barrier()
    except NeuronSpecError as error:
        print(f"neuronspec collect (rank {group.rank}): {error}", file=sys.stderr)
        return 1
    finally:
        if created:
            dist.destroy_process_group()
    return 0


def _report(summary: dict, group: Group) -> None:
    if not summary["computed"]:
        print(f"{summary['model']}: already cached ({summary['entry']})")
        return
    print(
        f"{summary['model']}: {summary['n_tokens']} tokens on {group.world_size} rank(s) in "
        f"{summary['seconds']:.1f} s -> {summary['entry']}"
    )
