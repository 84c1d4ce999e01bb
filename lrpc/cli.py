"""The `lrpc` command line. Every user error is one line on stderr and exit code 2; no partial files.

Commands live in lrpc/commands/, one module each with the same protocol (HELP, EXAMPLES,
`add_arguments(parser)`, `run(args) -> int`); `COMMANDS` below is the one table of them."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# command name → module in lrpc/commands/, in the order `lrpc --help` lists them
COMMANDS = ("compile", "plan", "diff", "ops", "zoo", "export", "demo", "evaluate", "explain", "bench", "concepts")

EXAMPLES = """examples:
  lrpc compile model.onnx -o explainer.onnx                 # AttnLRP explainer of the first output
  lrpc compile model.onnx -o gxi.onnx --preset gxi          # plain Input×Gradient
  lrpc plan model.onnx                                      # which rule each node gets
  lrpc plan model.onnx --format json -o plan.json && lrpc diff plan.json new_model.onnx
  lrpc explain llama --text "the cat sat on the"            # the predicted next token, as a heatmap
  lrpc ops                                                  # ops with a relevance rule
  lrpc demo                                                 # explain sentence similarity with MiniLM
"""


def command(name: str):
    return importlib.import_module(f"lrpc.commands.{name}")


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad option value (`--top-k abc`) told in one line, as every other user error, not
    after the whole usage block."""

    def error(self, message: str):
        self.exit(2, _printable(f"{self.prog}: error: {message} (`{self.prog} -h` lists the options)") + "\n")


def build_parser() -> argparse.ArgumentParser:
    from lrpc import __version__
    parser = _Parser(prog="lrpc", description="Compile transformers into ONNX explainers that "
                                     "compute AttnLRP relevance in one onnxruntime run.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lrpc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = command(name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP, epilog=module.EXAMPLES or None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
    return parser


def _printable(message: str) -> str:
    """One line, whatever the stream's encoding: undecodable path bytes (surrogates) shown as \\xNN escapes."""
    message = " ".join(message.splitlines())
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    return message.encode(encoding, "backslashreplace").decode(encoding, "replace")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from lrpc.errors import LrpcError, missing_extra
    try:
        return command(args.command).run(args)
    except LrpcError as exc:
        print(_printable(f"lrpc: error: {exc}"), file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # an optional dependency reached without an early check
        hint = missing_extra(exc.name or "")
        if hint is None:
            raise
        print(_printable(f"lrpc: error: {hint}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lrpc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout (`| head`) stopped reading: not an error of lrpc's
        sys.stdout = open(os.devnull, "w")
        return 0
    except Exception as exc:  # never a traceback for the user; LRPC_DEBUG=1 shows it
        if os.environ.get("LRPC_DEBUG"):
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        print(_printable(f"lrpc: error: {type(exc).__name__}: {first} (unexpected; rerun with LRPC_DEBUG=1 for "
                         "details)"), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
