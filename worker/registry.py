"""`python -m worker.registry`: the operator's command line for the registry (contract/registry.py).

    python -m worker.registry list
    python -m worker.registry demo                  # build the demo registry (digits MLPs)
    python -m worker.registry demo --generative     # ... plus a tiny GPT and DDPM (--full: bench sizes)
    python -m worker.registry add-model --id ID --task classification --architecture builtin:mlp \\
        --params '{"in_features": 64, ...}' --weights w.safetensors --input-shape 64 [--num-classes 10]
    python -m worker.registry add-dataset --id ID --shard a.safetensors --shard b.safetensors

It lives with the worker because `demo` trains the demo models (torch).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from contract.registry import Registry, RegistryError
from contract.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.registry", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=None, help="registry directory (default: ATTR_REGISTRY_DIR)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list")
    demo = sub.add_parser("demo", help="build the demo registry (trains a digits MLP in seconds)")
    demo.add_argument("--if-absent", action="store_true")
    demo.add_argument("--generative", action="store_true", help="also a tiny GPT and DDPM (worker/generative.py)")
    demo.add_argument("--full", action="store_true", help="with --generative: the benchmark's sizes (minutes)")
    m = sub.add_parser("add-model")
    m.add_argument("--id", required=True)
    m.add_argument("--task", required=True)
    m.add_argument("--architecture", required=True)
    m.add_argument("--params", default="{}")
    m.add_argument("--weights", type=Path, required=True)
    m.add_argument("--input-shape", type=int, nargs="+", required=True)
    m.add_argument("--input-dtype", default="float32")
    m.add_argument("--num-classes", type=int)
    d = sub.add_parser("add-dataset")
    d.add_argument("--id", required=True)
    d.add_argument("--shard", type=Path, action="append", required=True)
    d.add_argument("--input-shape", type=int, nargs="+", required=True)
    d.add_argument("--input-dtype", default="float32")
    args = parser.parse_args(argv)
    registry = Registry(args.root or Settings().registry_dir)
    try:
        if args.command == "list":
            for item in registry.models() + registry.datasets():
                print(f"{type(item).__name__.removesuffix('Manifest').lower():8} {item.id:24} {item.digest[:12]}")  # noqa: T201 (CLI output)
        elif args.command == "demo":
            if not (args.if_absent and registry.model("digits-audit-mlp") and registry.dataset("digits-audit-test")):
                from .demo import build_demo_registry

                print("demo: training two digits MLPs (seconds) ...", flush=True)  # noqa: T201 (what serve waits on)
                build_demo_registry(registry)
            if args.generative and not (args.if_absent and registry.model("digits-ddpm")):
                from .generative import build_generative_registry

                print("demo: training a tiny GPT and a tiny DDPM (about a minute) ...", flush=True)  # noqa: T201
                build_generative_registry(registry, full=args.full)
            print(f"demo registry built in {registry.root}")  # noqa: T201
        elif args.command == "add-model":
            spec = {"shape": args.input_shape, "dtype": args.input_dtype, "num_classes": args.num_classes}
            registry.add_model(args.id, args.task, args.architecture, args.weights, spec, json.loads(args.params))
        elif args.command == "add-dataset":
            registry.add_dataset(args.id, args.shard, {"shape": args.input_shape, "dtype": args.input_dtype})
    except (RegistryError, ValidationError, OSError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
