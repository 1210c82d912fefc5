"""``python -m neuronspec report RESULTS --out DIR``: the HTML report of a results file
(:mod:`neuronspec.report.html`), no models needed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from neuronspec.report.html import write_report
from neuronspec.report.results import ResultsFileError, load_results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m neuronspec report",
        description="Write the HTML report of a run from its results file (no models needed).",
    )
    parser.add_argument("results", type=Path, help="results JSON (pytest --neuronspec-results)")
    parser.add_argument("--out", type=Path, required=True, help="directory for index.html")
    parser.add_argument(
        "--plots",
        type=Path,
        default=None,
        help="the run's figures (default: the --plots-dir recorded in the results)",
    )
    args = parser.parse_args(argv)
    try:
        results = load_results(args.results)
        page = write_report(results, args.out, plots_dir=args.plots, results_path=args.results)
    except ResultsFileError as error:
        print(f"neuronspec report: {error}", file=sys.stderr)
        return 2
    print(page)
    return 0
