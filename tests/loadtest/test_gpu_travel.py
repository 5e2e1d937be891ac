"""What travels to a GPU machine (``loadtest/gpu_travel.sh``): a prepared working tree leaves the
shipped weights behind and carries what ``size`` says; restoring brings them back, and nothing
leaves the repository. Run on a clone of this repository's HEAD (with this checkout's scripts),
never on the checkout itself."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _sh(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)


def _clone(tmp_path: Path, *how: str) -> Path:
    clone = tmp_path / "clone"
    assert _sh(ROOT, "git", "clone", "-q", *how, str(ROOT), str(clone)).returncode == 0
    (clone / "loadtest").mkdir(exist_ok=True)
    for script in ("gpu_travel.sh", "gpu_travel_size.sh"):
        shutil.copy(ROOT / "loadtest" / script, clone / "loadtest" / script)
    return clone


def _weights(tree: Path) -> dict[str, str]:
    return {
        str(p.relative_to(tree)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((tree / "model" / "weights").rglob("*.safetensors"))
    }


def _tree_bytes(tree: Path) -> int:
    listed = _sh(tree, "git", "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    files = [tree / f for f in listed.stdout.split("\0") if f]
    return sum(f.stat().st_size for f in files if f.is_file())


@pytest.mark.slow
def test_a_prepared_tree_travels_without_the_weights_and_restores_them(tmp_path: Path) -> None:
    clone = _clone(tmp_path, "--no-hardlinks")
    before = _weights(clone)
    assert len(before) >= 4  # the shipped models' weights and the classifier's

    prepared = _sh(clone, "bash", "loadtest/gpu_travel.sh", "prepare")
    assert prepared.returncode == 0, prepared.stderr
    assert _weights(clone) == {}  # gone from the working tree...
    assert _sh(clone, "git", "cat-file", "-e", f"HEAD:{next(iter(before))}").returncode == 0
    mib = int(re.findall(r"^travels: (\d+) MiB$", prepared.stdout, re.M)[-1])
    # ...and what the copy would hold is what size counted (rounded up to MiB; no .whl here)
    assert mib == -(-_tree_bytes(clone) // 2**20)
    assert mib < 56

    size = _sh(clone, "bash", "loadtest/gpu_travel_size.sh")
    assert size.returncode == 0 and size.stdout.splitlines()[-1] == f"travels: {mib} MiB"

    assert _sh(clone, "bash", "loadtest/gpu_travel.sh", "restore").returncode == 0
    assert _weights(clone) == before
    assert _sh(clone, "git", "status", "--porcelain", "--untracked-files=no").stdout == ""


def test_size_fails_at_the_limit_and_counts_carried_wheels(tmp_path: Path) -> None:
    clone = _clone(tmp_path, "--no-checkout")
    wheels = clone / ".whl"
    wheels.mkdir()
    (clone / ".git" / "info" / "exclude").write_text("/.whl/\n")
    (wheels / "big.whl").write_bytes(b"\0" * (57 * 2**20))
    over = _sh(clone, "bash", "loadtest/gpu_travel_size.sh")
    assert over.returncode == 1
    assert int(over.stdout.splitlines()[-1].split()[1]) >= 57
