"""What people try first with the Python API and the command line: a torch module straight into
`lrpc.Attributor`, one meaning per flag across commands, and no internal references in user-facing text."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import lrpc

ROOT = Path(__file__).resolve().parent.parent


def test_attributor_takes_a_torch_module_with_example_inputs(tmp_path):
    torch = pytest.importorskip("torch")

    class Pool(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.head = torch.nn.Embedding(128, 6), torch.nn.Linear(6, 4)

        def forward(self, input_ids):
            return self.head(torch.tanh(self.emb(input_ids)).mean(dim=1))

    module = Pool()
    ids = torch.tensor([[5, 9, 17, 3]])
    a = lrpc.Attributor(module, example_inputs={"input_ids": ids}, preset="gxi", tokenizer="toy", cache=tmp_path)
    r = a.attribute({"input_ids": np.array([[7, 11, 13]])}, target=2)
    emb = module.emb(torch.tensor([[7, 11, 13]])).detach().requires_grad_(True)   # the oracle: autograd x·∇x
    y = module.head(torch.tanh(emb).mean(dim=1))[0, 2]
    (grad,) = torch.autograd.grad(y, emb)
    np.testing.assert_allclose(r.relevance, (emb * grad).sum(-1)[0].detach().numpy(), rtol=1e-5, atol=1e-7)
    assert r.logit == pytest.approx(float(y.detach()), rel=1e-5)
    assert module.training   # the module is left in the mode it was given in
    with pytest.raises(lrpc.LrpcError, match=r"example_inputs=\{'input_ids': ids\}") as err:
        lrpc.Attributor(module)
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize("model", [42, {"input_ids": [1, 2]}, None])
def test_attributor_refuses_other_objects_in_one_line(model):
    with pytest.raises(lrpc.LrpcError, match=f"cannot explain a {type(model).__name__}: give a zoo name") as err:
        lrpc.Attributor(model)
    assert len(str(err.value).splitlines()) == 1


def help_texts() -> dict[str, str]:
    """`lrpc --help` and `lrpc CMD --help` of every command."""
    from lrpc.cli import build_parser
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices   # argparse's sub-parsers
    return {"lrpc": parser.format_help(), **{name: p.format_help() for name, p in commands.items()}}


def test_no_internal_references_in_help_docstrings_or_messages():
    """Issue numbers ("the issue-6 workload") mean nothing to users: none in help texts, docstrings, comments
    or messages of the package."""
    pattern = re.compile(r"\bissues?[ -]?#?\d+", re.IGNORECASE)
    found = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
             for folder in ("lrpc", "passes", "models") for path in sorted((ROOT / folder).rglob("*.py"))
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    found += [f"lrpc {cmd} --help: {line.strip()}" for cmd, text in help_texts().items()
              for line in text.splitlines() if pattern.search(line)]
    assert not found, "\n".join(found)


def test_one_meaning_per_flag_across_commands():
    """An option shared by several commands takes the same kind of value everywhere (a switch, one value, an
    optional value) — the wording of its help may name the command's own files — and `--layers` is only
    `lrpc explain`'s per-layer relevance switch."""
    from lrpc.cli import build_parser
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    kinds: dict[str, dict] = {}
    for name, p in commands.items():
        for action in p._actions:
            if action.help == "==SUPPRESS==":   # an old spelling, kept only to refuse it with the new one
                continue
            for flag in action.option_strings:
                kinds.setdefault(flag, {})[name] = (type(action).__name__, action.nargs)
    differing = {flag: by_command for flag, by_command in kinds.items()
                 if len(set(by_command.values())) > 1 and flag not in OPTIONAL_VALUE}
    assert not differing, differing
    assert kinds["--layers"] == {"explain": ("_StoreTrueAction", 0)}
    assert {k for k, v in kinds["--json"].items() if v == ("_StoreAction", "?")} == {"evaluate"}


# a switch that may also take a file: `evaluate --json` prints the JSON like `explain --json` / `bench --json`,
# `evaluate --json FILE` writes it there
OPTIONAL_VALUE = {"--json"}


@pytest.mark.parametrize("args, new", [(["compile", "m.onnx", "-o", "e.onnx", "--layers", "mlp"], "--rule-nodes 'mlp'"),
                                       (["plan", "m.onnx", "--layers", "mlp"], "--rule-nodes 'mlp'"),
                                       (["bench", "llama-bench", "--layers", "4"], "--depth 4")])
def test_the_old_layers_forms_are_refused_naming_the_new_one(args, new, capsys):
    from lrpc.cli import main
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("lrpc: error: --layers") and new in err and len(err.strip().splitlines()) == 1


def test_compile_api_refuses_the_old_layers_keyword():
    from tests.onnx_builders import float_model
    with pytest.raises(lrpc.LrpcError, match=r"compile\(rule_nodes=REGEX\)"):
        lrpc.compile(float_model(), gamma_linear=0.25, layers="^mlp")


def test_totals_agree_in_every_output_with_token_type_ids(tmp_path):
    """Token-type ids carry relevance too (BERT-like): the explainer's conservation(), the Attribution,
    --json's relevance_sum, the terminal's Σ and the HTML report give one total, their share included."""
    import json

    from rich.console import Console

    from lrpc.inputs import Tokenizer
    from tests.onnx_builders import mean_pool_model
    a = lrpc.Attributor(mean_pool_model(token_types=True), tokenizer="toy", cache=tmp_path)
    r = a.attribute("a great movie , i love it")
    share = float(np.sum(r.relevances["token_type_ids"], dtype=np.float64))
    assert abs(share) > 1e-4   # the share is there, so leaving it out would show
    ids, _ = Tokenizer.toy().encode("a great movie , i love it")
    feed = {"input_ids": np.array([ids]), "token_type_ids": np.zeros((1, len(ids)), np.int64)}
    seed = np.zeros((1, a.explainer.output_dims(feed)[1]), np.float32)
    seed[0, r.target] = 1
    assert float(a.explainer.explain(feed, seed=seed).conservation()[0]) == pytest.approx(r.conservation, rel=1e-6)
    assert json.loads(r.to_json())["conservation"]["relevance_sum"] == r.conservation
    console = Console(record=True, width=200, color_system=None)
    r.show(console)
    printed = float(re.search(r"Σ relevance = ([+-][0-9.]+)", console.export_text()).group(1))
    assert printed == round(r.conservation, 4)
    assert float(re.search(r"Σ relevance = ([+-][0-9.]+)", r.to_html()).group(1)) == round(r.conservation, 5)
