"""Training (resumable) and the benchmark, at the smallest sizes: real data, real files."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from model.networks.checkpoint import load_pretrained
from model.networks.presets import preset
from model.training import bench, data
from model.training.evaluate import (
    frame_accuracy,
    frechet_distance,
    load_classifier,
    psnr_ssim,
    temporal_difference,
)
from model.training.options import BenchOptions
from model.training.train import class_indices
from service.cli import build_parser, main
from tests.model.helpers import train_run

pytestmark = pytest.mark.slow  # real training runs (a module fixture) and benchmarks

# The bench's fixed threshold settings: TeaCache, and adaptive Skip-Cache at N=4.
PEER_THRESHOLD_LABELS = [f"teacache th={t}" for t in (0.02, 0.03, 0.05)] + [
    f"skip_cache N=4 th={t}" for t in (0.02, 0.05, 0.1)
]


def train(out: Path, steps: int, *extra: str) -> None:
    train_run(out, steps, "--preset", "digits-tiny", "--batch-size", "8", *extra)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    train(root / "straight", 6)
    train(root / "resumed", 4)
    train(root / "resumed", 6)
    train(root / "vanilla", 6, "--vanilla")
    image = str(root / "straight" / "final")  # Latte's recipe: the video starts from it
    train(root / "video", 2, "--preset", "digits-video-tiny", "--init-from", image)
    # a video model trained on: the same network from the export (a step too small to move it)
    video = str(root / "video" / "final")
    train(root / "video-more", 1, "--preset", "digits-video-tiny", "--init-from", video,
          "--lr", "1e-12")  # fmt: skip
    for name, steps in (("dydit", 6), ("dydit-resumed", 4), ("dydit-resumed", 6)):
        train(root / name, steps, *DYDIT, "--from", image)
    return {p.name: p for p in root.iterdir()}


# A DyDiT fine-tune whose routers move within a few steps (the shipped one: --router-lr 0.05).
DYDIT = ["--dynamic", "--flops-ratio", "0.3", "--router-lr", "5"]


def test_resumed_training_equals_an_uninterrupted_run(runs: dict[str, Path]) -> None:
    straight = load_file(runs["straight"] / "snapshots" / "step_000006.safetensors")
    resumed = load_file(runs["resumed"] / "snapshots" / "step_000006.safetensors")
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key
    rows = (runs["resumed"] / "loss.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [1, 2, 3, 4, 5, 6]


def test_training_exports_a_loadable_model_with_its_card(runs: dict[str, Path]) -> None:
    model, card = load_pretrained(runs["vanilla"] / "final")
    assert not model.config.long_skip and card["architecture"] == "DiT" and card["steps"] == 6


def test_a_video_preset_trains_on_moving_digits_and_exports_a_video_model(
    runs: dict[str, Path],
) -> None:
    model, card = load_pretrained(runs["video"] / "final")
    assert model.config.kind == "video" and model.config.num_frames > 1
    assert card["architecture"] == "Skip-Latte" and "frames" in card["data"]
    assert card["init_from"] == str(runs["straight"] / "final")
    rows = (runs["video"] / "loss.csv").read_text().splitlines()
    assert len(rows) == 3 and float(rows[-1].split(",")[1]) > 0


def test_a_video_model_carries_on_from_a_video_export_of_its_network(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    start, _ = load_pretrained(runs["video"] / "final")
    more, card = load_pretrained(runs["video-more"] / "final")
    assert card["init_from"] == str(runs["video"] / "final") and card["steps"] == 1
    for key, value in start.state_dict().items():
        torch.testing.assert_close(more.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)
    with pytest.raises(SystemExit) as exit_:  # a bigger network than the export's
        train(tmp_path / "other", 1, "--preset", "digits-video-small", "--init-from",
              str(runs["video"] / "final"))  # fmt: skip
    said = capsys.readouterr().err
    assert exit_.value.code == 2 and "init_from: " in said and "another network" in said, said


def test_a_dydit_fine_tune_resumes_exactly_and_moves_toward_its_flops_target(
    runs: dict[str, Path],
) -> None:
    straight = load_file(runs["dydit"] / "snapshots" / "step_000006.safetensors")
    resumed = load_file(runs["dydit-resumed"] / "snapshots" / "step_000006.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(value, resumed[key]) for key, value in straight.items())
    model, card = load_pretrained(runs["dydit"] / "final")
    assert model.config.dynamic and model.config.long_skip
    assert card["architecture"] == "Skip-DiT + DyDiT"
    assert card["from"] == str(runs["straight"] / "final") and card["dydit"]["flops_ratio"] == 0.3
    with (runs["dydit"] / "loss.csv").open() as f:
        ratios = [float(row["flops"]) for row in csv.DictReader(f)]
    assert len(ratios) == 6 and ratios[0] > 0.95 and ratios[-1] < ratios[0] - 0.1


def test_a_dydit_fine_tune_needs_a_base_model() -> None:
    args = build_parser().parse_args(["train", "--out", "unused", "--dynamic"])
    with pytest.raises(SystemExit) as exited:
        args.func(args, "skipdit train")
    assert exited.value.code == 2


def test_boosted_classes_are_drawn_that_much_more_often() -> None:
    labels = data.load("sklearn", 16, "train").labels
    g = torch.Generator().manual_seed(0)
    share = {d: float((labels == d).float().mean()) for d in (7, 8)}
    plain = labels[class_indices(labels, 4000, g, [], 3.0)]
    boosted = labels[class_indices(labels, 4000, g, [7], 3.0)]
    expected = 3 * share[7] / (3 * share[7] + 1 - share[7])  # about 0.25
    assert abs(float((plain == 7).float().mean()) - share[7]) < 0.03
    assert abs(float((boosted == 7).float().mean()) - expected) < 0.03
    assert abs(float((boosted == 8).float().mean()) - share[8] / (2 * share[7] + 1)) < 0.03


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        (["--boost-classes", "10"], "boost_classes"),
        (["--boost-classes", "7", "--preset", "digits-t2i-tiny"], "boost_classes"),
        (["--scene-jitter", "4"], "scene_jitter"),  # a class preset draws no scenes
        (["--boost-motions", "up"], "boost_motions"),  # nor clips with motions
        (["--boost-motions", "up", "--preset", "digits-t2i-tiny"], "boost_motions"),
        (["--boost-motions", "sideways", "--preset", "digits-t2v-tiny"], "boost_motions"),
    ],
)
def test_options_of_another_kind_of_model_are_refused(extra: list[str], field: str, capsys) -> None:
    args = build_parser().parse_args(["train", "--out", "unused", *extra])
    with pytest.raises(SystemExit) as exited:
        args.func(args, "skipdit train")
    assert exited.value.code == 2 and field in capsys.readouterr().err


def test_data_splits_are_disjoint_and_scaled() -> None:
    train_set, held = data.load("mnist", 16, "train"), data.load("mnist", 16, "held_out")
    assert len(held.labels) == data.HELD_OUT and len(train_set.labels) == 5000 - data.HELD_OUT
    seen = {image.numpy().tobytes() for image in train_set.images}
    assert not any(image.numpy().tobytes() in seen for image in held.images)  # no digit in both
    assert train_set.images.min() >= -1 and train_set.images.max() <= 1
    assert set(held.labels.tolist()) == set(range(10))
    sk = data.load("sklearn", 16, "train")
    assert sk.images.shape[1:] == (1, 16, 16)


def test_shipped_classifier_recognises_held_out_digits() -> None:
    classifier = load_classifier()
    held = data.load(classifier.source, classifier.size, "held_out")
    predicted = classifier(held.images).argmax(1)
    assert (predicted == held.labels).float().mean() > 0.9


def test_frames_of_real_clips_are_judged_on_the_digit_they_show() -> None:
    """The per-frame judge finds the small moving digit: real clips score like still digits,
    where the whole frame (a 12 px digit on 16 px) fools the classifier."""
    classifier = load_classifier()
    held = data.load(classifier.source, 16, "held_out")
    clips = data.moving(held, torch.arange(200), torch.Generator().manual_seed(0), 8, 16,
                        data.clip_digit_size(16))  # fmt: skip
    uint8 = ((clips + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)  # (n,F,H,W,1)
    labels = held.labels[:200]
    judged = frame_accuracy(classifier, uint8, labels, data.clip_digit_size(16))
    whole = frame_accuracy(classifier, uint8, labels, 16)  # the window is the whole frame
    assert judged > 0.9 and whole < judged - 0.3
    frozen = uint8[:, :1].expand_as(uint8)
    assert temporal_difference(frozen) == 0 < temporal_difference(uint8)


def test_metrics_behave() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 8, generator=g).double().numpy()
    assert abs(frechet_distance(a, a)) < 1e-6
    assert frechet_distance(a, a + 3) > 8 * 9 - 1  # mean shift of 3 in 8 dims -> 72
    # Fewer samples than dimensions (rank-deficient covariance), diagonal covariances: FID is
    # sum_i (sqrt(var_a_i) - sqrt(var_b_i))^2 in closed form.
    d, k = 16, 5
    eye = np.eye(d)
    few = np.concatenate([2 * eye[:k], -2 * eye[:k]])  # (2k, d), variance 8/(2k-1) on k dims
    many = np.concatenate([eye, -eye])  # (2d, d), variance 2/(2d-1) on every dim
    var_a = np.r_[np.full(k, 8 / (2 * k - 1)), np.zeros(d - k)]
    var_b = np.full(d, 2 / (2 * d - 1))
    expected = ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    assert frechet_distance(few, many) == pytest.approx(expected, rel=1e-9)
    images = torch.randint(0, 256, (2, 16, 16, 1), dtype=torch.uint8, generator=g)
    assert psnr_ssim(images, images)[1] == pytest.approx(1.0)
    noisy = (images.int() + 20).clamp(0, 255).to(torch.uint8)
    psnr, ssim = psnr_ssim(noisy, images)
    assert 15 < psnr < 40 and ssim < 1


def test_bench_writes_tables_plots_and_grid(runs: dict[str, Path], tmp_path: Path) -> None:
    opts = BenchOptions(
        models=[str(runs["straight"] / "final")], per_class=1, steps=6, intervals=[2],
        thresholds=[0.1], seed=0, runs=[runs["straight"], runs["vanilla"]], curve_steps=3,
        repeats=2, out=tmp_path / "bench", command_line="skipdit bench (test)",
    )  # fmt: skip
    rows = bench.bench(opts)
    labels = ["none", "skip_cache N=2", "fora N=2", "delta_dit N=2", "toca N=2 r=0.25"]
    labels += ["fbcache th=0.1", *PEER_THRESHOLD_LABELS]
    assert [r.label for r in rows] == labels
    by = {r.label: r for r in rows}
    assert by["none"].ssim == pytest.approx(1.0) and by["none"].flop_ratio == 1.0
    assert by["skip_cache N=2"].flop_ratio > 1 and by["fora N=2"].flop_ratio > 1
    assert by["fora N=2"].cache_bytes_per_image > by["skip_cache N=2"].cache_bytes_per_image > 0
    for name in ("results.md", "speedup_vs_psnr.png", "grid.png", "training.png"):
        assert (tmp_path / "bench" / name).stat().st_size > 0
    table = (tmp_path / "bench" / "results.md").read_text()
    assert table.count("\n| ") == 1 + len(rows)
    stored = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert len(stored) == len(rows)


def test_bench_prints_the_floors_of_a_shipped_model_beside_its_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["bench", "--models", "digits-skip-dit", "--per-class", "1", "--steps", "4",
            "--intervals", "2", "--thresholds", "0.1", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    rows = [ln for ln in printed.splitlines() if ln.startswith("| digits-skip-dit |")]
    settings = [ln.split(" | ")[1] for ln in rows]
    assert settings == ["none", "skip_cache N=2", "fora N=2", "delta_dit N=2", "toca N=2 r=0.25",
                        "fbcache th=0.1", *PEER_THRESHOLD_LABELS]  # fmt: skip
    assert all(ln.endswith(" | ok |") or " | BELOW: " in ln for ln in rows)
    assert printed.count("| digits-skip-dit |") == len(rows)  # the floors, in results.md too
    assert (tmp_path / "results.md").read_text().count("| digits-skip-dit |") == 2 * len(rows)


def test_bench_judges_a_video_model_per_frame_and_writes_gif_strips(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    opts = BenchOptions(
        models=[str(runs["video"] / "final")], per_class=1, steps=4, intervals=[2],
        thresholds=[0.1], out=tmp_path / "bench", command_line="skipdit bench (test)",
    )  # fmt: skip
    rows = bench.bench(opts)
    labels = ["none", "skip_cache N=2", "fora N=2", "delta_dit N=2", "fbcache th=0.1"]
    labels += PEER_THRESHOLD_LABELS
    assert [r.label for r in rows] == labels  # toca refuses video
    assert all(r.fid is None and r.temporal is not None and 0 <= r.accuracy <= 1 for r in rows)
    by = {r.label: r for r in rows}
    assert by["none"].ssim == pytest.approx(1.0) and by["skip_cache N=2"].flop_ratio > 1
    gifs = sorted((tmp_path / "bench").glob("strip_*.gif"))
    assert len(gifs) == len(rows) and not (tmp_path / "bench" / "grid.png").exists()
    with Image.open(gifs[0]) as gif:
        assert gif.n_frames == 4  # the tiny preset's frames, classes side by side
    table = (tmp_path / "bench" / "results.md").read_text()
    assert table.count("\n| ") == 1 + len(rows) and "real moving-digit clips" in table


def test_twins_are_compared_at_equal_flop_ratio() -> None:
    skip, plain = preset("digits-tiny"), preset("digits-tiny", long_skip=False)
    assert bench.twins({"s": skip, "p": plain, "other": preset("digits-small")}) == [("s", "p")]

    def row(model: str, label: str, flops: float, psnr: float) -> bench.Row:
        return bench.Row(model, label, label.split()[0], 1.0, flops, 0.0, psnr, 1.0, 1.0, None, 0.5)

    rows = [row("s", "none", 1.0, math.inf), row("s", "skip_cache N=2", 1.5, 30.0),
            row("s", "skip_cache N=3", 2.0, 26.0), row("p", "skip_cache N=2", 1.6, 28.0),
            row("p", "skip_cache N=3", 2.2, 24.0), row("p", "fora N=2", 2.0, 40.0)]  # fmt: skip
    lines = bench.twin_lines(rows, "s", "p")
    table = [ln.split(" | ")[1:] for ln in lines[3:]]
    assert table == [  # by policy, then FLOP ratio; psnr of s, of p, s minus p
        ["fora N=2 (p)", "2.00x", "-", "40.0", "- |"],  # fora only on p: nothing to compare
        ["skip_cache N=2 (s)", "1.50x", "30.0", "-", "- |"],  # below p's range
        ["skip_cache N=2 (p)", "1.60x", "29.2", "28.0", "+1.2 dB |"],  # s at 1.6x: 29.2
        ["skip_cache N=3 (s)", "2.00x", "26.0", "25.3", "+0.7 dB |"],  # p at 2.0x: 25.33
        ["skip_cache N=3 (p)", "2.20x", "-", "24.0", "- |"],
    ]
