"""The private torch/Accelerate attributes vaegan relies on (vaegan._compat) still work as vaegan uses them.

When an upgrade removes or changes one, this test fails with the names of the broken ones, before any
training run trips over them.
"""

from __future__ import annotations

import ast
from pathlib import Path

from vaegan import _compat

ROOT = Path(__file__).resolve().parents[1]

# Private attributes of torch/Accelerate that only vaegan/_compat.py may touch.
PRIVATE = ("_original_forward", "found_inf", "TORCH_SAFE_GLOBALS", "_reset_state", "_foreach_mul_", "_foreach_add_",
           "_foreach_mul", "_python_dispatch", "_local_scalar_dense")


def test_every_internal_vaegan_relies_on_still_works():
    problems = _compat.check()
    assert not problems, "torch/Accelerate internals that changed:\n" + "\n".join(problems)


def test_a_broken_internal_is_reported_by_name(monkeypatch):
    def broken() -> None:
        raise AttributeError("module 'torch' has no attribute '_foreach_mul_'")

    monkeypatch.setattr(_compat, "CHECKS", [("torch._foreach_mul_", broken), *_compat.CHECKS[1:]])
    problems = _compat.check()
    assert problems == ["torch._foreach_mul_: AttributeError: module 'torch' has no attribute '_foreach_mul_'"]


def test_no_other_module_touches_those_internals():
    offenders = []
    for folder in ("vaegan", "plugins", "benchmarks", "recipes", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name in ("_compat.py", "test_compat.py"):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Attribute):
                    # found_inf is also vaegan's own name (StepOutput.found_inf): only setting it on an optimizer counts.
                    if node.attr != "found_inf" or isinstance(node.ctx, ast.Store):
                        names.append(node.attr)
                elif isinstance(node, (ast.Import, ast.ImportFrom)):
                    names += [a.name for a in node.names] + ([node.module] if getattr(node, "module", None) else [])
                for name in names:
                    if any(p == part for p in PRIVATE for part in name.split(".")):
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert not offenders, "use vaegan._compat instead:\n" + "\n".join(offenders)
