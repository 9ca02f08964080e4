"""List, stage (download) and verify the pretrained weights a config needs.

python pipelines/weights.py list --config configs/…yaml [key.sub=value ...]
python pipelines/weights.py download --config configs/…yaml --dir /shared/weights   (network)
python pipelines/weights.py verify --config configs/…yaml --dir /shared/weights     (air-gapped)
Then on every node: TORCH_HOME=/shared/weights/torch HF_HOME=/shared/weights/huggingface.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from rfsr_ray.config import load_config, with_absolute_paths
from rfsr_ray.errors import RFSRError
from rfsr_ray.weights import (
    block_downloads,
    fetch,
    stage_env,
    verify_manifest,
    weights_needed,
    why_missing,
    write_manifest,
)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["list", "download", "verify", "_resolve"])
    parser.add_argument("--config", help="YAML config whose weights to handle")
    parser.add_argument("--dir", type=Path, help="staging folder (download, verify)")
    parser.add_argument("--fetch", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return parser.parse_intermixed_args(argv)


def resolve_in(directory: Path, args: argparse.Namespace, download: bool) -> list[dict]:
    """Run `_resolve` in a child process whose torch/pyiqa/HF caches live in `directory`
    (pyiqa fixes its cache folder at import, so the environment must be set before)."""
    command = [sys.executable, __file__, "_resolve", "--config", args.config or ""]
    command += ["--fetch"] if download else []
    env = {**os.environ, **stage_env(directory, offline=not download)}
    done = subprocess.run(
        [*command, *args.overrides], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RFSRError(f"weight resolution failed:\n{done.stderr[-2000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    try:
        cfg = with_absolute_paths(load_config(args.config, args.overrides))
        needs = weights_needed(cfg)
        if args.action == "_resolve":  # child process: caches already point at the folder
            if not args.fetch:
                block_downloads()
            for need in needs:
                if args.fetch:
                    fetch(need, cfg)
                print(json.dumps({"need": need.name, "used_by": need.used_by,
                                  "missing": why_missing(need, cfg)}))  # fmt: skip
            return 0
        if args.action == "list":
            for need in needs:
                print(f"{need.kind:9} {need.name:40} ({need.used_by})")
            print(f"{len(needs)} weight(s); weight-free pyiqa metrics are not listed")
            return 0
        if args.dir is None:
            raise RFSRError(f"{args.action} needs --dir FOLDER (the staging folder)")
        args.dir.mkdir(parents=True, exist_ok=True)
        results = resolve_in(args.dir.resolve(), args, download=args.action == "download")
        problems = [f"{r['used_by']} {r['need']}: {r['missing']}" for r in results if r["missing"]]
        if args.action == "download":
            print(f"manifest: {write_manifest(args.dir)}")
        else:
            problems += verify_manifest(args.dir)
    except RFSRError as error:
        sys.stderr.write(f"error: {type(error).__name__}: {error}\n")
        return 2
    for problem in problems:
        print(f"MISSING {problem}")
    print(f"{args.dir}: {len(results)} weight(s) checked, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
