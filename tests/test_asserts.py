"""The suite's own asserts can fail: no assert compares an expression with itself, asserts a
value that is always true (a constant, a bare call of something that returns an object, ">= 0"
of a count), or expects any exception at all. And what tests share lives in helpers modules: no
file of the suite imports from a test module or a conftest. Read from every file's syntax tree."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).parent
# Calls whose result is an object that is always true (subprocess.run's CompletedProcess).
OBJECT_RETURNING = {"run", "Popen", "CompletedProcess"}


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def _always_true(test: ast.expr) -> str | None:
    """Why the assert's test cannot fail, or None."""
    if isinstance(test, ast.BoolOp):
        parts = [_always_true(v) for v in test.values]
        if isinstance(test.op, ast.And):
            return next((p for p in parts if p), None)
        return parts[0] if all(parts) else None
    if isinstance(test, ast.Constant):
        return "a constant"
    if isinstance(test, ast.Call) and _name(test.func) in OBJECT_RETURNING:
        return f"{_name(test.func)}(...) returns an object, always true"
    if isinstance(test, ast.Compare):
        sides = [test.left, *test.comparators]
        for op, left, right in zip(test.ops, sides[:-1], sides[1:], strict=True):
            if ast.dump(left) == ast.dump(right):
                return "compares a value with itself"
            if isinstance(op, ast.GtE) and isinstance(right, ast.Constant) and right.value == 0:
                return ">= 0, true of any count or size"
    return None


def _findings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert) and (why := _always_true(node.test)):
            out.append(f"{path.name}:{node.lineno}: assert {why}")
        if (
            isinstance(node, ast.Call)
            and _name(node.func) == "raises"
            and node.args
            and _name(node.args[0]) in {"Exception", "BaseException"}
        ):
            out.append(f"{path.name}:{node.lineno}: pytest.raises of any exception")
    return out


def test_no_assert_in_the_suite_is_always_true() -> None:
    findings = [f for path in sorted(TESTS.rglob("test_*.py")) for f in _findings(path)]
    assert findings == []


def test_the_check_finds_what_it_looks_for(tmp_path: Path) -> None:
    bad = tmp_path / "test_bad.py"
    bad.write_text(
        "def test():\n"
        "    assert run('x')\n"
        "    assert a == a\n"
        "    assert ok and len(xs) >= 0\n"
        "    assert True\n"
        "    with pytest.raises(Exception):\n"
        "        pass\n"
        "    assert a == b and c.count(d) > 0\n"
    )
    assert [f.split(": ", 1)[1] for f in _findings(bad)] == [
        "assert run(...) returns an object, always true",
        "assert compares a value with itself",
        "assert >= 0, true of any count or size",
        "assert a constant",
        "pytest.raises of any exception",
    ]


def _is_test_module(dotted: str) -> bool:
    """``tests.service.test_api``, ``tests.conftest``, ``test_api`` (relative)..."""
    last = dotted.rpartition(".")[2]
    return last.startswith("test_") or last == "conftest"


def _imports_of_test_modules(path: Path) -> list[str]:
    """Each import in ``path`` of a test module or a conftest (or of a name from one)."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            # ``from tests.service import test_api``: the names may be modules themselves.
            modules = [base, *(f"{base.rstrip('.')}.{alias.name}" for alias in node.names)]
        else:
            continue
        if any(_is_test_module(m) for m in modules):
            out.append(f"{path.name}:{node.lineno}: imports {modules[0]}")
    return out


def test_no_file_of_the_suite_imports_from_a_test_module_or_a_conftest() -> None:
    """Shared helpers live in tests/helpers.py, tests/model/helpers.py, tests/service/helpers.py:
    a test module imported by another runs its module-level code twice under two names, and a
    conftest is pytest's to load."""
    findings = [f for path in sorted(TESTS.rglob("*.py")) for f in _imports_of_test_modules(path)]
    assert findings == []


def test_the_import_check_finds_what_it_looks_for(tmp_path: Path) -> None:
    bad = tmp_path / "test_bad.py"
    source = (  # "T" for "tests": no line of this file is an import the check reports
        "import T.service.test_api\n"
        "from T.conftest import tiny\n"
        "from T.service.conftest import Clock\n"
        "from T.model.test_cache import CACHING\n"
        "from T.service import test_redis_workers as plain\n"
        "from .test_pipeline import tiny_vae\n"
        "from T.helpers import tiny\n"
        "from T.service.helpers import Clock\n"
        "from T import helpers\n"
        "import pytest\n"
    )
    bad.write_text(source.replace("T.", "tests.").replace("from T ", "from tests "))
    assert [f.split(": ", 1)[1] for f in _imports_of_test_modules(bad)] == [
        "imports tests.service.test_api",
        "imports tests.conftest",
        "imports tests.service.conftest",
        "imports tests.model.test_cache",
        "imports tests.service",
        "imports .test_pipeline",
    ]
