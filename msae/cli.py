"""`msae` console script: small entry points around the library and the pipeline.

A configuration that cannot be used (bad key or value, bad YAML, missing file) ends every
subcommand with its message on stderr and exit status 2, never a traceback: the message names
the key to change, and a traceback would only bury it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

EXIT_CONFIG = 2  # the same status argparse uses for a bad command line
EXIT_NOTHING = 1  # an export found nothing to export where asked


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
    export = sub.add_parser("export", help="export a store's results to another tool's format")
    formats = export.add_subparsers(dest="format", required=True)
    neuronpedia = formats.add_parser(
        "neuronpedia", help="explained latents as Neuronpedia JSONL (docs/formats.md, 'Neuronpedia export')")
    neuronpedia.add_argument("--config", help="config file (default: MSAE_CONFIG, else MSAE_PROFILE)")
    neuronpedia.add_argument("--store", help="store to read (default: the config's store)")
    neuronpedia.add_argument("--out", help="output folder (default: <store>/export/neuronpedia)")
    neuronpedia.add_argument("--layer", type=int, help="only this layer (default: every layer with concepts)")
    neuronpedia.add_argument("--width", type=int, help="only this width (default: every width with concepts)")
    return parser


def _root(ref: str) -> str:
    """A store root from the command line: URLs as they are, local paths made absolute."""
    return ref if "://" in ref else str(Path(ref).resolve())


def _export_neuronpedia(args: argparse.Namespace) -> int:
    from msae.config import load_config
    from msae.export.neuronpedia import export_neuronpedia
    from msae.store import Store

    cfg = load_config(args.config)
    if args.store:
        cfg = cfg.model_copy(update={"store": _root(args.store)})
    out = Store(_root(args.out)) if args.out else None
    results = export_neuronpedia(cfg, Store(cfg.store), out, None if args.layer is None else [args.layer],
                                 None if args.width is None else [args.width])
    for r in results:
        print(f"layer {r.layer} width {r.width}: {r.features} features -> {r.path}")
    return 0


def _run(args: argparse.Namespace, rest: list[str]) -> int:
    if args.command == "config":
        from msae.config import load_config

        print(load_config().model_dump_json(indent=2))
        return 0
    if args.command == "materialize":
        from msae_assets.materialize import main as materialize

        return materialize(rest)
    if args.command == "export":
        return _export_neuronpedia(args)  # the only format so far
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
    from msae.export import ExportError

    parser = _build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command == "export":  # materialize and train-vlm pass unknown arguments on
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return _run(args, rest)
    except (ConfigError, ValidationError, yaml.YAMLError) as err:
        print(f"msae {args.command}: {config_error_message(err, args.command)}", file=sys.stderr)
        return EXIT_CONFIG
    except ExportError as err:
        print(f"msae {args.command}: {err}", file=sys.stderr)
        return EXIT_NOTHING


if __name__ == "__main__":
    sys.exit(main())
