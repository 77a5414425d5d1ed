"""`msae` console script: small entry points around the library and the pipeline.

A configuration that cannot be used (bad key or value, bad YAML, missing file) ends every
subcommand with its message on stderr and exit status 2, never a traceback: the message names
the key to change, and a traceback would only bury it.
"""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

EXIT_CONFIG = 2  # the same status argparse uses for a bad command line


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msae", description="Multimodal concepts in VLMs with SAEs")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("config", help="print the resolved configuration (MSAE_CONFIG / MSAE_PROFILE)")
    sub.add_parser("materialize", help="materialize every asset with the Dagster CLI")
    world = sub.add_parser("world", help="write a shapes world (LLaVA format + annotations)")
    world.add_argument("out", help="output folder")
    world.add_argument("--seed", type=int, default=0)
    world.add_argument("--n-images", type=int, default=400)
    sub.add_parser("train-vlm", help="train the embedded default's small LLaVA-NeXT (see --help)", add_help=False)
    return parser


def _run(args: argparse.Namespace, rest: list[str]) -> int:
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
    from msae.embedded.vlm_train import main as train  # train-vlm: the only command left

    return train(rest) or 0


def config_error_message(err: Exception, command: str) -> str:
    """The user-facing text of a configuration error (pydantic errors listed key by key)."""
    if isinstance(err, ValidationError):
        from msae.config import _format_validation_error

        return _format_validation_error(err, f"arguments of msae {command}")
    return str(err)


def main(argv: list[str] | None = None) -> int:
    import yaml

    from msae.config import ConfigError

    parser = _build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        return _run(args, rest)
    except (ConfigError, ValidationError, yaml.YAMLError) as err:
        print(f"msae {args.command}: {config_error_message(err, args.command)}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
