"""The `moefuse` console script: `moefuse <command> [args]`. Each command lives in its own module with a
`main(argv)`; they are imported only when called, so `moefuse --help` is instant."""

from __future__ import annotations

import importlib
import sys

from moefuse.errors import detach_stdout, flush_stdout, stdout_closed

# command -> (module, one-line help). Each module defines `main(argv: list[str] | None) -> int | None`.
COMMANDS: dict[str, tuple[str, str]] = {
    "build-shards": ("moefuse.commands.build_shards", "validate a manifest and write webdataset tar shards"),
    "demo-data": ("moefuse.commands.demo_data", "generate the built-in synthetic multimodal demo dataset"),
    "train": ("moefuse.commands.train", "joint multi-task training from a YAML config (also under accelerate launch)"),
    "evaluate": ("moefuse.commands.evaluate", "metrics of an exported model on shards"),
    "predict": ("moefuse.commands.predict", "predictions for one sample or a manifest, as JSON Lines"),
    "serve": ("moefuse.commands.serve", "serve an exported model over HTTP (POST /predict, GET /health, GET /info)"),
    "export": ("moefuse.commands.export", "(re)write a training run's model folder from its checkpoints"),
    "ensemble": ("moefuse.commands.ensemble", "combine exported models into an ensemble folder (cross-fitted)"),
    "compress": ("moefuse.commands.compress", "prune a model's least-routed MoE experts on calibration data"),
    "demo": ("moefuse.commands.demo", "demo data -> shards -> train -> evaluate -> predict, end to end"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: moefuse <command> [options]   (or: python -m moefuse ...; moefuse --version)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`moefuse <command> --help` describes a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run `moefuse ARGV`. A reader of stdout that has gone (`moefuse --help | head -1`) ends any command quietly
    with EXIT_STDOUT_CLOSED (141, as for a program SIGPIPE ended), never with a BrokenPipeError traceback."""
    try:
        try:
            return dispatch(sys.argv[1:] if argv is None else argv)
        finally:
            flush_stdout()
    except BrokenPipeError:
        if not stdout_closed():
            raise
        return detach_stdout()


def dispatch(argv: list[str]) -> int:
    """The usage, or the named command's `main(rest)` (imported only now)."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from moefuse import __version__

        print(f"moefuse {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"moefuse: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
