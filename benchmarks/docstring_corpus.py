"""A real-English corpus available offline: sentences from the docstrings of the Python standard library.

Deterministic: the modules are read in sorted order from this interpreter's standard library (no
third-party package, so the corpus does not change with what is installed), each docstring is split into
sentences, and a sentence is kept when it is plain prose (8 to 40 words, letters mostly, no code or
markup), once. The first N kept sentences are written, one per line:

    python benchmarks/docstring_corpus.py -o sentences.txt --n 3000
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import sysconfig
from pathlib import Path

SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
CODE = re.compile(r"[{}\[\]<>=_`|\\#@$*/]|\.\.\.|>>>|::|\(\)")


def prose(text: str) -> bool:
    words = text.split()
    if not 8 <= len(words) <= 40 or CODE.search(text) or not text[0].isupper() or text[-1] not in ".!?":
        return False
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return letters / len(text) > 0.9


def docstrings(path: Path):
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield doc


def sentences(n: int) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    seen, kept = set(), []
    for path in sorted(root.rglob("*.py")):
        if any(part in ("test", "tests", "idlelib", "site-packages", "lib2to3") for part in path.relative_to(root).parts):
            continue
        for doc in docstrings(path):
            for paragraph in re.split(r"\n\s*\n", doc):
                for sentence in SENTENCE.split(" ".join(paragraph.split())):
                    if prose(sentence) and sentence not in seen:
                        seen.add(sentence)
                        kept.append(sentence)
                        if len(kept) == n:
                            return kept
    return kept


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", required=True)
    parser.add_argument("--n", type=int, default=3000)
    args = parser.parse_args()
    from lrpc import safeio
    found = sentences(args.n)
    if len(found) < args.n:
        print(f"only {len(found)} sentences found", file=sys.stderr)
    safeio.write_text(args.out, "\n".join(found) + "\n")
    print(f"wrote {len(found)} sentences to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
