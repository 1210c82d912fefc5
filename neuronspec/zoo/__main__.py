"""``python -m neuronspec.zoo train|eval tiny-gpt2|tiny-mamba``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from neuronspec.zoo import EMBEDDED_MODELS, weights_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m neuronspec.zoo")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train an embedded model from scratch on the toy world")
    tr.add_argument("name", choices=EMBEDDED_MODELS)
    tr.add_argument("--steps", type=int, default=None, help="optimizer steps (default: recipe)")
    tr.add_argument("--out", type=Path, default=None, help="directory (default: shipped weights)")
    tr.add_argument(
        "--no-fast-scan",
        action="store_true",
        help="train a Mamba on transformers' reference scan instead of neuronspec's",
    )
    ev = sub.add_parser("eval", help="held-out perplexity and fact recall, printed as JSON")
    ev.add_argument("name", choices=EMBEDDED_MODELS)
    ev.add_argument("--dir", type=Path, default=None, help="model directory (default: shipped)")
    ev.add_argument(
        "--write", action="store_true", help="also write eval.json and README.md into the dir"
    )
    args = parser.parse_args(argv)

    if args.command == "train":
        import dataclasses

        from neuronspec.zoo.train import RECIPES, train

        cfg = RECIPES[args.name]
        if args.steps is not None:
            cfg = dataclasses.replace(cfg, steps=args.steps)
        log = train(
            args.name, args.out or weights_dir(args.name), cfg, fast_scan=not args.no_fast_scan
        )
        print(json.dumps({k: log[k] for k in ("model", "seconds", "n_params")}))
    else:
        from neuronspec.zoo.evaluate import evaluate, write_card

        directory = args.dir or weights_dir(args.name)
        result = evaluate(directory)
        print(json.dumps(result, indent=1))
        if args.write:
            write_card(args.name, directory, result)


if __name__ == "__main__":
    main()
