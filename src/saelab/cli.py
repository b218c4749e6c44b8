"""The `saelab` command: train and dissect sparse autoencoders; one subcommand per experiment or entry point.

Each subcommand is driven by a typed config whose every field is a flag.

Thin by design: parse the config, call the entry point, turn saelab errors into one clear line and a non-zero exit.
Only the chosen command's module is imported (`saelab --help` imports none), so help is instant and a command
never pays for another's dependencies.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from saelab.runtime import configure_process

configure_process()  # before any command imports torch

from saelab.errors import SaelabError  # noqa: E402


@dataclass(frozen=True)
class Command:
    help: str
    config: str  # "module:ConfigClass"
    run: str  # "module:function", called with the parsed config
    prints: bool = False  # the function returns text for the terminal


COMMANDS: dict[str, Command] = {
    "demo": Command("harvest, train, evaluate and report on the offline default (SmolLM2)",
                    "saelab.experiments.demo.run:DemoConfig", "saelab.experiments.demo.run:run"),
    "harvest": Command("stream a model's activations at hookpoints into an on-disk store",
                       "saelab.activations.harvest:HarvestConfig", "saelab.activations.harvest:harvest_from_config"),
    "train": Command("train an SAE on an activation store",
                     "saelab.training.entry:TrainConfig", "saelab.training.entry:train_from_config"),
    "evaluate": Command("reconstruction and downstream (CE/KL spliced) metrics of a trained SAE",
                        "saelab.evaluation:EvaluateConfig", "saelab.evaluation:evaluate_from_config"),
    "frontier": Command("deep vs shallow SAEs: the NMSE-vs-k frontier, dead latents and CE recovered on one store",
                        "saelab.experiments.frontier.run:FrontierConfig", "saelab.experiments.frontier.run:run"),
    "autointerp": Command("explain and score an SAE's latents (detection, fuzzing), or compare two SAEs, and write "
                          "their feature pages",
                          "saelab.experiments.autointerp.run:AutointerpConfig",
                          "saelab.experiments.autointerp.run:run"),
    "contexts": Command("top-activating and random activating contexts of chosen latents, as marked text",
                        "saelab.interp.contexts:ContextsConfig", "saelab.interp.contexts:write_contexts", prints=True),
    "dark-matter": Command("what SAEs fail to reconstruct: experiments (1)-(10) of the dark-matter write-up over a "
                           "width sweep",
                           "saelab.experiments.dark_matter.run:DarkMatterConfig",
                           "saelab.experiments.dark_matter.run:run"),
    "connectors-lm": Command("feature connectors in a language model: SAEs on an MLP's input and output, connectors, "
                             "linearity, readable relations, CE with the MLP replaced",
                             "saelab.experiments.connectors.run_lm:LMConnectorsConfig",
                             "saelab.experiments.connectors.run_lm:run"),
    "connectors-mnist": Command("feature connectors on MNIST: MLP, per-layer SAEs, connectors, simulated spans",
                                "saelab.experiments.connectors.run_mnist:MnistConnectorsConfig",
                                "saelab.experiments.connectors.run_mnist:run"),
    "multilayer": Command("one SAE over several layers' residual streams: train, per-layer FVU, banding, decoder "
                          "cosines and information flow",
                          "saelab.experiments.multilayer.run:MultiLayerConfig",
                          "saelab.experiments.multilayer.run:run"),
    "convert": Command("convert an SAE between formats (reads saelab, SAELens, sparsify, dictionary_learning, "
                       "Gemma Scope; writes saelab, SAELens, sparsify)",
                       "saelab.saes.formats.convert:ConvertConfig", "saelab.saes.formats.convert:convert",
                       prints=True),
    "export-transcoders": Command("write a run's per-layer transcoders as the transcoder set circuit-tracer loads "
                                 "(config.yaml + layer_L.safetensors)",
                                 "saelab.saes.formats.circuit_tracer:ExportTranscodersConfig",
                                 "saelab.saes.formats.circuit_tracer:export_transcoders", prints=True),
    "view": Command("serve a run folder (reports, feature browser) on 127.0.0.1 at a free port until Ctrl-C",
                    "saelab.view:ViewConfig", "saelab.view:view"),
}


def _resolve(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def load_command(name: str) -> tuple[type, Callable[[Any], object]]:
    """(config class, entry function) of a command, importing only its module."""
    command = COMMANDS[name]
    return _resolve(command.config), _resolve(command.run)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command listed; only `command` (if given) gets its config's flags."""
    from saelab.config import add_config_arguments

    parser = argparse.ArgumentParser(prog="saelab", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, spec in COMMANDS.items():
        command_parser = sub.add_parser(name, help=spec.help, description=spec.help)
        if name == command:
            add_config_arguments(command_parser, _resolve(spec.config))
    return parser


def _command_name(argv: Sequence[str]) -> str | None:
    """The first positional argument, when it names a command (options before it take no values)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = _command_name(argv)
    args = build_parser(name if name in COMMANDS else None).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    from saelab.config import config_from_args

    config_cls, run = load_command(args.command)
    try:
        cfg = config_from_args(config_cls, args)
        result = run(cfg)
    except SaelabError as exc:
        print(f"saelab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"saelab {args.command}: interrupted; what was written so far is intact (rerun to resume)",
              file=sys.stderr)
        return 130
    if COMMANDS[args.command].prints:
        print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
