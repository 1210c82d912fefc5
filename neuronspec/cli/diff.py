"""``python -m neuronspec diff OLD NEW``: the findings that changed between two results files
(:mod:`neuronspec.report.diff`); exit 1 when one is out of tolerance or removed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from neuronspec.report.diff import diff_results, format_markdown, format_text
from neuronspec.report.results import ResultsFileError, load_results
from neuronspec.snapshot import RUN_ALPHA, FindingsSnapshotExtension, findings_extension


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m neuronspec diff",
        description="List the findings that changed between two results files, with the "
        "snapshots' tolerance (values with a standard error: judged in SEs). Exit 1 when a "
        "finding is out of tolerance or removed.",
    )
    parser.add_argument("old", type=Path, help="results JSON of the earlier run")
    parser.add_argument("new", type=Path, help="results JSON of the later run")
    parser.add_argument("--markdown", action="store_true", help="Markdown (CI job summary)")
    parser.add_argument("--rel", type=float, default=FindingsSnapshotExtension.rel_tol)
    parser.add_argument("--abs", type=float, default=FindingsSnapshotExtension.abs_tol)
    parser.add_argument(
        "--alpha",
        type=float,
        default=RUN_ALPHA,
        help="false-alarm rate of the values with a standard error, over the whole diff",
    )
    parser.add_argument("--max-changes", type=int, default=20, help="changes listed per finding")
    args = parser.parse_args(argv)
    try:
        old, new = load_results(args.old), load_results(args.new)
        extension = findings_extension(rel=args.rel, abs=args.abs)()
        result = diff_results(old, new, extension=extension, alpha=args.alpha)
    except (ResultsFileError, ValueError, TypeError) as error:
        print(f"neuronspec diff: {error}", file=sys.stderr)
        return 2
    formatter = format_markdown if args.markdown else format_text
    sys.stdout.write(formatter(result, max_changes=args.max_changes))
    return 1 if result.failed else 0
