"""Run the benchmark sections: ``python -m neuronspec.bench [--quick] [--only NAME]``."""

from __future__ import annotations

import argparse
import importlib
import os

from neuronspec.bench import print_table
from neuronspec.heap import keep_malloc_heap

SECTIONS = [
    "scan",
    "capture",
    "suite",
    "attention",
    "ablation",
    "ig",
    "scale",
    "causal",
    "suite-real",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m neuronspec.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller inputs, fewer repeats")
    parser.add_argument("--only", choices=SECTIONS, help="run only this section")
    parser.add_argument(
        "--keep-malloc-heap",
        action="store_true",
        help="keep glibc's malloc heap between forwards (neuronspec.heap; as the plugin's option)",
    )
    parser.add_argument(
        "--suite-shapes",
        nargs="+",
        choices=["gpt2", "mamba130m"],
        help="suite-real: only these shapes (default both)",
    )
    parser.add_argument(
        "--suite-pytest-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="suite-real: one more option for its pytest run, e.g. --suite-pytest-arg=--control-seeds=19",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kept = args.keep_malloc_heap and keep_malloc_heap()
    print(f"malloc heap kept between forwards (neuronspec.heap): {'yes' if kept else 'no'}")
    for name in [args.only] if args.only else SECTIONS:
        section = importlib.import_module(f"neuronspec.bench.{name.replace('-', '_')}")
        print(f"== {name}{' (quick)' if args.quick else ''}")
        options = {}
        if name == "suite-real":
            options = {"shapes": args.suite_shapes, "pytest_args": args.suite_pytest_arg}
        print_table(section.run(quick=args.quick, **options))


if __name__ == "__main__":
    main()
