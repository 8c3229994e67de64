"""The files' shape: imports run one way, captioner <- data <- evaluate <- train, with no late import."""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = ("captioner", "data", "evaluate", "train")
ALLOWED = {"captioner": set(), "data": {"captioner"}, "evaluate": {"captioner", "data"},
           "train": {"captioner", "data", "evaluate"}}


def imported(module: str) -> tuple[set, set]:
    """-> (our modules imported at the top, our modules imported inside a function or class)."""
    tree = ast.parse(open(os.path.join(REPO, module + ".py")).read())
    top, late = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names = {(node.module or "").split(".")[0]}
        else:
            continue
        (top if node in tree.body else late).update(names & set(OURS))
    return top, late


@pytest.mark.parametrize("module", OURS)
def test_imports_run_one_way(module):
    top, late = imported(module)
    assert top <= ALLOWED[module], f"{module}.py imports {top - ALLOWED[module]}"
    assert not late, f"{module}.py imports {late} late"
