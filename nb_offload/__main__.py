"""Command line: ``nb-offload demo`` or ``nb-offload plan MODEL --gpu 6GiB`` (also ``python -m nb_offload ...``)."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nb-offload", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="load a tiny model made here through every tier and generate")
    demo.add_argument("--folder", default=None, help="where to keep the model (default ./.demo)")
    demo.add_argument("--max-new-tokens", type=int, default=40)
    plan = sub.add_parser("plan", help="dry run: where each unit would live (no weights read)")
    plan.add_argument("model")
    for tier in ("gpu", "cpu"):
        plan.add_argument(f"--{tier}", default=None)
    plan.add_argument("--disk", default=None)
    plan.add_argument("--context", type=int, default=None)
    args = parser.parse_args(argv)
    from .errors import OffloadError
    try:
        if args.command == "demo":
            from .demo import run
            return run(args.folder, args.max_new_tokens)
        from . import plan as make_plan
        print(make_plan(args.model, gpu=args.gpu, cpu=args.cpu, disk=args.disk, context=args.context))
        return 0
    except OffloadError as exc:
        print(f"nb-offload: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
