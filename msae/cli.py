"""`msae` console script: small entry points around the library and the pipeline."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="msae", description="Multimodal concepts in VLMs with SAEs")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("config", help="print the resolved configuration (MSAE_CONFIG / MSAE_PROFILE)")
    sub.add_parser("materialize", help="materialize every asset with the Dagster CLI")
    world = sub.add_parser("world", help="write a shapes world (LLaVA format + annotations)")
    world.add_argument("out", help="output folder")
    world.add_argument("--seed", type=int, default=0)
    world.add_argument("--n-images", type=int, default=400)
    sub.add_parser("train-vlm", help="train the embedded default's small LLaVA-NeXT (see --help)", add_help=False)
    args, rest = parser.parse_known_args(argv)

    if args.command == "config":
        from msae.config import load_config

        print(load_config().model_dump_json(indent=2))
        return 0
    if args.command == "materialize":
        from msae_assets.materialize import main as materialize

        return materialize(rest)
    if args.command == "world":
        from msae.world.config import ShapesConfig
        from msae.world.shapes import generate_world

        files = generate_world(ShapesConfig(seed=args.seed, n_images=args.n_images), args.out)
        print(files)
        return 0
    if args.command == "train-vlm":
        from msae.embedded.vlm_train import main as train

        return train(rest) or 0
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
