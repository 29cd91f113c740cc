"""The package's layers, as ARCHITECTURE.md draws them: imports only point down (or sideways).

Layer 1 is pure math and models, layer 2 compiled steps and their plumbing, layer 3 programs.
Every module of the package must be placed in a layer here, so a new file cannot slip in
unclassified.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jaxalign"

LAYERS = {
    1: ("jaxalign", "jaxalign.losses", "jaxalign.advantages", "jaxalign.kl_control",
        "jaxalign.logprobs", "jaxalign.masking", "jaxalign.models", "jaxalign.settings",
        "jaxalign.testing", "jaxalign.chunked_logprobs"),
    2: ("jaxalign.train", "jaxalign.sampling", "jaxalign.sharding", "jaxalign.checkpoint",
        "jaxalign.data", "jaxalign.tokenizer", "jaxalign.batching", "jaxalign.distributed",
        "jaxalign.rewards", "jaxalign.chat_template", "jaxalign.conversation",
        "jaxalign.plan"),
    3: ("jaxalign.cli", "jaxalign.demo", "jaxalign.evaluate", "jaxalign.plots", "jaxalign.feedback"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The layer of ``module``: that of its longest listed prefix (``jaxalign`` itself, the
    layer-1 face, only by its own name)."""
    best = None
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            inside = module == prefix or (prefix != "jaxalign" and module.startswith(prefix + "."))
            if inside and (best is None or len(prefix) > len(best[1])):
                best = (layer, prefix)
    if best is None:
        raise KeyError(f"{module} is in no layer: add it to LAYERS in tests/test_layout.py")
    return best[0]


def jaxalign_imports(path: Path) -> set[str]:
    """Every ``jaxalign`` module ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("jaxalign")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                node.module.startswith("jaxalign")):
            # ``from jaxalign import train`` imports the submodule jaxalign.train
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if (PACKAGE.parent / sub.replace(".", "/")).exists()
                          or (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists()
                          else node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; jaxalign uses absolute imports")
    return found


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer():
    assert {m: layer_of(m) for m in MODULES}  # layer_of raises for an unplaced module
    assert layer_of("jaxalign.losses.policy") == 1 and layer_of("jaxalign.train.rlhf") == 2
    assert layer_of("jaxalign.cli.ppo") == 3
    with pytest.raises(KeyError, match="jaxalign.newthing is in no layer"):
        layer_of("jaxalign.newthing")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    upward = sorted(imported for imported in jaxalign_imports(MODULES[module])
                    if layer_of(imported) > layer_of(module))
    assert not upward, f"{module} (layer {layer_of(module)}) imports upwards: {upward}"


def test_the_issue_rules_hold_by_name():
    """Nothing in layer 1 imports train, cli or demo; nothing in train imports cli or demo."""
    for module, path in MODULES.items():
        banned = (("jaxalign.train", "jaxalign.cli", "jaxalign.demo") if layer_of(module) == 1
                  else ("jaxalign.cli", "jaxalign.demo") if module.startswith("jaxalign.train")
                  else ())
        bad = [i for i in jaxalign_imports(path) if i.startswith(banned)] if banned else []
        assert not bad, f"{module} imports {bad}"


def test_the_checker_sees_upward_imports(tmp_path):
    """A layer-1 file importing the CLI is caught (the test above can fail)."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from jaxalign.cli.train import train\n    return train\n")
    assert jaxalign_imports(bad) == {"jaxalign.cli.train"}
    assert layer_of("jaxalign.cli.train") > layer_of("jaxalign.masking")
