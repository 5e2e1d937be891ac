"""Mutation check of the cache tests: deliberately broken cache policies that must turn a named
test red.

Each mutant is one small edit of one function's source (the real code, edited as text, compiled
into the function's module and put in its place), so a mutant is exactly "the policy, with this
bug". As a pytest plugin (``pytest -p tests.mutants --mutant NAME ...``) it applies one mutant
before the tests run and reports which tests killed it. ``python -m tests.mutants`` runs the
cache tests once per mutant (stopping at the first failure; a run per core at once, each on one
torch thread) and exits 1 if any mutant survived or a run broke otherwise; CI runs it.
"""

from __future__ import annotations
import __future__

import importlib
import inspect
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class Mutant:
    """Replace ``old`` by ``new`` (once) in the source of ``source`` ("module:Class.attr" or
    "module:function") and install the result as ``target`` (default: ``source``)."""

    why: str
    source: str
    old: str
    new: str
    target: str | None = None


MUTANTS: dict[str, Mutant] = {
    "fora-swapped-branches": Mutant(
        "FORA feeds each block's stored MLP output to its attention branch and vice versa",
        "model.cache.fora:Fora.forward_cached",
        "return (lambda h: attn), (lambda h: mlp)",
        "return (lambda h: mlp), (lambda h: attn)",
    ),
    "fora-neighbour-store": Mutant(
        "FORA's block k reads block k+1's stored outputs",
        "model.cache.fora:Fora.forward_cached",
        'stored[("attn", k)], stored[("mlp", k)]',
        'stored[("attn", (k + 1) % model.config.depth)], '
        'stored[("mlp", (k + 1) % model.config.depth)]',
    ),
    "fora-stale-store": Mutant(
        "FORA's store is filled at the first full step and never refreshed",
        "model.cache.interval:IntervalPolicy.on_full",
        "state.stored = {",
        "state.stored = state.stored or {",
        target="model.cache.fora:Fora.on_full",
    ),
    "skip-cache-wrong-deep-feature": Mutant(
        "Skip-Cache stores the hidden state entering unit D-K-1 and fuses it in front of D-K",
        "model.cache.skip_cache:SkipCache.capture_blocks",
        "deep = model.units - config.depth",
        "deep = model.units - config.depth - 1",
    ),
    "teacache-never-resets": Mutant(
        "TeaCache keeps its accumulated change after a computed step",
        "model.cache.teacache:TeaCache.forward_cached",
        "state.accumulated = 0.0",
        "pass",
    ),
    "delta-dit-stages-swapped": Mutant(
        "Delta-DiT skips the front blocks early and the rear blocks late",
        "model.cache.delta_dit:DeltaDiT.forward_cached",
        "early = t >= config.boundary",
        "early = t < config.boundary",
    ),
    "toca-freshest-tokens": Mutant(
        "ToCa recomputes the freshest tokens instead of the stalest",
        "model.cache.toca:ToCa.forward_cached",
        "idx = (staleness + order).topk(m, dim=1).indices",
        "idx = (order - staleness).topk(m, dim=1).indices",
    ),
    "fbcache-stale-residual": Mutant(
        "fbcache keeps the residual of its first full step when it recomputes",
        "model.cache.fbcache:FBCache.forward_cached",
        "state.first, state.residual = first[rows].clone(), mine - first[rows]",
        "state.first = first[rows].clone()",
    ),
}
# The tests a mutant runs against, cheapest first (a run stops at its first failure).
TESTS = [
    "tests/model/test_cache_structure.py",
    "tests/model/test_cache.py",
    "tests/model/test_cache_contract.py",
    "tests/model/test_teacache.py",
    "tests/model/test_quality_floors.py",
]


def _resolve(spec: str) -> tuple[object, str, object]:
    """(owner: module or class, attribute name, module) of "module:Class.attr" or
    "module:function"."""
    module_name, _, path = spec.partition(":")
    module = importlib.import_module(module_name)
    *owners, attr = path.split(".")
    owner: object = module
    for name in owners:
        owner = getattr(owner, name)
    return owner, attr, module


def apply(mutant: Mutant) -> None:
    owner, attr, module = _resolve(mutant.source)
    source = textwrap.dedent(inspect.getsource(getattr(owner, attr)))
    if source.count(mutant.old) != 1:
        raise RuntimeError(f"mutant's text is not once in {mutant.source}: {mutant.old!r}")
    code = compile(
        source.replace(mutant.old, mutant.new),
        f"<mutant of {mutant.source}>",
        "exec",
        flags=__future__.annotations.compiler_flag,
        dont_inherit=True,
    )
    target_owner, target_attr, target_module = _resolve(mutant.target or mutant.source)
    namespace = dict(vars(module)) | dict(vars(target_module))
    exec(code, namespace)  # the mutant: this file's own text, edited
    setattr(target_owner, target_attr, namespace[attr])


# ----------------------------------------------------------------------------- pytest plugin


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--mutant", choices=sorted(MUTANTS), help="apply this broken cache policy")


def pytest_configure(config: pytest.Config) -> None:
    name = config.getoption("--mutant")
    if name:
        apply(MUTANTS[name])


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    name = config.getoption("--mutant")
    if not name:
        return
    killers = [r.nodeid for r in terminalreporter.stats.get("failed", [])]
    line = f"mutant {name}: " + (f"killed by {', '.join(killers)}" if killers else "SURVIVED")
    terminalreporter.write_line(line, red=not killers, green=bool(killers))


# ----------------------------------------------------------------------------- CI runner


def _run(name: str) -> subprocess.CompletedProcess[str]:
    """The cache tests with mutant ``name`` applied, stopping at the first failure."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "tests.mutants", "--mutant", name,
         "-p", "no:cacheprovider", *TESTS],
        capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def main() -> int:
    survived, broken = [], []
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        runs = pool.map(_run, MUTANTS)  # in MUTANTS' order, a run per core at once
        for (name, mutant), run in zip(MUTANTS.items(), runs, strict=True):
            print(f"== mutant {name}: {mutant.why}", flush=True)
            print("\n".join(ln for ln in run.stdout.splitlines() if ln.startswith("mutant ")))
            if run.returncode == 0:
                survived.append(name)
            elif run.returncode != 1:  # 1: tests failed; anything else broke the run itself
                broken.append(name)
                print(run.stdout[-3000:], run.stderr[-3000:])
    print(f"{len(MUTANTS) - len(survived) - len(broken)} of {len(MUTANTS)} mutants killed"
          + (f"; survived: {survived}" if survived else "")
          + (f"; runs broken: {broken}" if broken else ""))  # fmt: skip
    return 1 if survived or broken else 0


if __name__ == "__main__":
    sys.exit(main())
