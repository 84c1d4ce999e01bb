"""The `lrpc` commands, one module each (docs/design.md, "Commands").

Every command module has the same protocol, and lrpc/cli.py's `COMMANDS` table lists them:

    HELP = "one line for `lrpc --help`"
    EXAMPLES = "examples: ..."            # shown under `lrpc COMMAND --help` ("" for none)
    def add_arguments(parser) -> None     # its options (shared groups come from lrpc.commands.common)
    def run(args) -> int                  # the exit status; user errors raise LrpcError (exit 2)

A command module imports only the standard library and lrpc.commands.common at its top; what it runs is
imported inside `run` (torch only where a command needs it), so `lrpc --help` and `lrpc zoo` stay light.
To add a command: write lrpc/commands/NAME.py with this protocol and add NAME to `COMMANDS` in lrpc/cli.py.
"""
