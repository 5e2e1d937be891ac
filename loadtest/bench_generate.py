"""``skipdit generate`` timings at cache interval 1..4, one process per run, printed as a table.

    python loadtest/bench_generate.py [--model NAME] [--steps 50] [--num-images 4]

End-to-end speedup is wall time at interval 1 over wall time at N (same seed, same everything
else); model speedup is the CLI's own uncached-equivalent / actual model time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--intervals", default="1,2,3,4")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(x) for x in args.intervals.split(",")]:
            cmd = [sys.executable, "-m", "service.cli", "generate", "--json", "--steps",
                   str(args.steps), "--num-images", str(args.num_images), "--cache-interval",
                   str(n), "--out", f"{tmp}/n{n}.png"]  # fmt: skip
            if args.model:
                cmd += ["--model", args.model]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]["seconds_total"]
    print(f"model {rows[0]['model']}, {args.steps} DDIM steps, {args.num_images} images")
    print("| N | full steps | cached steps | full step ms | cached step ms | total s "
          "| end-to-end speedup | model speedup |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        cached = r["mean_cached_step_seconds"]
        print(
            f"| {r['cache_interval']} | {r['steps_full']} | {r['steps_cached']} "
            f"| {r['mean_full_step_seconds'] * 1e3:.1f} "
            f"| {'-' if cached is None else f'{cached * 1e3:.1f}'} | {r['seconds_total']:.2f} "
            f"| {base / r['seconds_total']:.2f}x | {r['speedup']:.2f}x |"
        )


if __name__ == "__main__":
    main()
