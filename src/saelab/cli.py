"""The `saelab` command: one subcommand per recipe, each driven by a typed config whose every field is a flag.

Thin by design: parse the config, call the recipe, turn saelab errors into one clear line and a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from saelab.runtime import configure_process

configure_process()  # before any recipe imports torch

from saelab.config import Config, add_config_arguments, config_from_args  # noqa: E402
from saelab.errors import SaelabError  # noqa: E402


@dataclass(frozen=True)
class Command:
    help: str
    module: str  # recipes module holding `CONFIG` (a Config class) and `run(cfg)`


COMMANDS: dict[str, Command] = {
    "demo": Command("harvest, train, evaluate and report on the offline default (SmolLM2)", "saelab.recipes.demo"),
    "harvest": Command("stream a model's activations at hookpoints into an on-disk store", "saelab.recipes.harvest"),
    "train": Command("train an SAE on an activation store", "saelab.recipes.train"),
    "evaluate": Command("reconstruction and downstream (CE/KL spliced) metrics of a trained SAE",
                        "saelab.recipes.evaluate"),
    "frontier": Command("deep vs shallow SAEs: the NMSE-vs-k frontier, dead latents and CE recovered on one store",
                        "saelab.recipes.frontier"),
    "autointerp": Command("explain and score an SAE's latents (detection, fuzzing), or compare two SAEs, and write "
                          "their feature pages", "saelab.recipes.autointerp"),
    "contexts": Command("top-activating and random activating contexts of chosen latents, as marked text",
                        "saelab.recipes.contexts"),
    "dark-matter": Command("what SAEs fail to reconstruct: experiments (1)-(10) of the dark-matter write-up over a "
                           "width sweep", "saelab.recipes.dark_matter"),
    "connectors-lm": Command("feature connectors in a language model: SAEs on an MLP's input and output, connectors, "
                             "linearity, readable relations, CE with the MLP replaced", "saelab.recipes.connectors_lm"),
    "connectors-mnist": Command("feature connectors on MNIST: MLP, per-layer SAEs, connectors, simulated spans",
                                "saelab.recipes.connectors_mnist"),
    "multilayer": Command("one SAE over several layers' residual streams: train, per-layer FVU, banding, decoder "
                          "cosines and information flow", "saelab.recipes.multilayer"),
}


def _load(command: Command) -> tuple[type[Config], Callable[[Config], object]]:
    module = importlib.import_module(command.module)
    return module.CONFIG, module.run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saelab", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        config_cls, _ = _load(command)
        command_parser = sub.add_parser(name, help=command.help, description=command.help)
        add_config_arguments(command_parser, config_cls)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    config_cls, run = _load(COMMANDS[args.command])
    try:
        cfg = config_from_args(config_cls, args)
        run(cfg)
    except SaelabError as exc:
        print(f"saelab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"saelab {args.command}: interrupted; what was written so far is intact (rerun to resume)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
