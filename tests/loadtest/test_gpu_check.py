"""``loadtest/gpu_check.sh`` keeps to the budget written in it: every stage runs under its
stated share, and the shares (the setup's included) add up to at most 7 minutes."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "loadtest" / "gpu_check.sh"
BUDGET_S = 7 * 60


def test_the_stages_keep_to_the_budget_written_in_the_script() -> None:
    text = SCRIPT.read_text()
    assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False).returncode == 0
    limits = [int(n) for n in re.findall(r"^\s*stage \w+ (\d+) ", text, re.M)]
    setup = [int(n) for n in re.findall(r"^\s*timeout (\d+) python3 -m pip", text, re.M)]
    assert len(limits) >= 5 and len(setup) == 1  # tests, two per-op, loops, diffusers
    header = re.search(r"Stage shares:\n(.*?)\n#\s+-+\n#\s+(\d+) s", text, re.S)
    assert header is not None
    stated = [int(n) for n in re.findall(r"(\d+) s$", header.group(1), re.M)]
    assert stated == setup + limits  # the header states each stage's share, in order
    assert sum(stated) == int(header.group(2)) <= BUDGET_S
