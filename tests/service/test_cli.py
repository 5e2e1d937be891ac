"""``skipdit generate`` as a user runs it: a real subprocess, real files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from model.networks.checkpoint import save_pretrained
from service.cli import main
from tests.helpers import tiny, tiny_text_model

CLI = [sys.executable, "-m", "service.cli"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_pretrained(tiny(), tmp_path_factory.mktemp("models") / "tiny", card={"name": "t"})


@pytest.mark.slow
def test_generate_writes_a_png_grid_and_prints_stats(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    proc = run(
        "generate", "--model", str(model_dir), "--class-label", "3", "--steps", "6",
        "--cache-interval", "3", "--num-images", "4", "--seed", "0", "--out", str(out), "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["steps_full"] + stats["steps_cached"] == 6 and stats["steps_cached"] == 3
    assert stats["random_weights"] is False
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)


@pytest.mark.slow
def test_generate_runs_the_shipped_dydit_routed_or_static(tmp_path: Path) -> None:
    for flag in ("--dynamic", "--no-dynamic"):
        out = tmp_path / f"{flag}.png"
        assert run("generate", "--model", "digits-skip-dydit", flag, "--steps", "3",
                   "--out", str(out)).returncode == 0  # fmt: skip
    assert (tmp_path / "--dynamic.png").read_bytes() != (tmp_path / "--no-dynamic.png").read_bytes()


@pytest.mark.slow
def test_same_seed_writes_the_same_png(model_dir: Path, tmp_path: Path) -> None:
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for path in paths:
        proc = run("generate", "--model", str(model_dir), "--steps", "4", "--out", str(path))
        assert proc.returncode == 0, proc.stderr
    assert paths[0].read_bytes() == paths[1].read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize(("out", "size"), [("v.gif", (22, 12)), ("v.png", (42, 22))])
def test_generate_on_a_video_model_writes_an_animation_or_a_grid_of_frames(
    tmp_path: Path, out: str, size: tuple[int, int]
) -> None:
    """Two 4-frame 8x8 videos: a GIF of per-frame grids (2 side by side) or a PNG grid with one
    row per video, one column per frame."""
    proc = run(
        "generate", "--model", "random:digits-video-tiny", "--steps", "2", "--num-images", "2",
        "--num-frames", "4", "--out", str(tmp_path / out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    with Image.open(tmp_path / out) as image:
        frames = getattr(image, "n_frames", 1)
        assert image.size == size and frames == (4 if out.endswith("gif") else 1)


@pytest.mark.slow
def test_console_script_says_when_weights_are_random(tmp_path: Path) -> None:
    exe = shutil.which("skipdit")
    assert exe is not None, "the skipdit console script is not installed"
    proc = subprocess.run(
        [exe, "generate", "--model", "random:digits-tiny", "--steps", "3", "--out",
         str(tmp_path / "r.png")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM untrained weights" in proc.stdout
    assert (tmp_path / "r.png").is_file()


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--steps", "-5"], "steps"),
        (["--steps", "0"], "steps"),
        (["--cache-interval", "0"], "cache_interval"),
        (["--model", "no-such-model"], "model"),
        (["--class-label", "10"], "class_label"),
        (["--class-label", "-1"], "class_label"),
        (["--num-images", "17"], "num_images"),
        (["--sampler", "euler"], "sampler"),
        (["--sampler", "flow_euler"], "sampler"),  # an eps model
        (["--prompt", "a red cat on a sofa"], "prompt"),  # a class model
        (["--prompt", "a\x07"], "prompt"),  # a control character
        (["--negative-prompt", "blurry"], "negative_prompt"),
        (["--guidance-scale", "0.5"], "guidance_scale"),
        (["--cache-depth", "3"], "cache_depth"),
        (["--cache-policy", "none", "--cache-interval", "2"], "cache_interval"),
        (["--steps", "abc"], "--steps"),
        (["--num-frames", "4"], "num_frames"),  # an image model
        (["--model", "random:digits-video-tiny", "--num-frames", "5"], "num_frames"),
        (["--fps", "0"], "fps"),
        (["--dynamic"], "dynamic"),  # a model without DyDiT routers
        (["--no-dynamic"], "dynamic"),
    ],
)
def test_invalid_input_exits_nonzero_with_one_line_naming_the_field(
    model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    field: str,
) -> None:
    model = [] if "--model" in args else ["--model", str(model_dir)]
    with pytest.raises(SystemExit) as exit_:
        main(["generate", *model, *args, "--out", str(tmp_path / "x.png")])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("skipdit generate: error: ") and field in lines[0]
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_invalid_input_from_a_real_process_on_the_default_model(tmp_path: Path) -> None:
    proc = run("generate", "--class-label", "12", "--out", str(tmp_path / "x.png"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "skipdit generate: error: class_label: must be in [0, 9], got 12"
    ]


# Runs CLI commands with the train extra's modules made unimportable, as on a base install (a None
# entry in sys.modules: importing it raises ModuleNotFoundError, find_spec answers None). One
# process runs them all, in turn (an import of torch and the model code costs seconds): each
# command's exit code, stdout and stderr come back as JSON; anything else raised ends the process.
WITHOUT_TRAIN_EXTRA = """
import contextlib, io, json, sys
for name in ("sklearn", "mlxtend", "torchmetrics", "matplotlib"):
    sys.modules[name] = None
import service.api  # the served app imports nothing from an extra
from service.cli import main
said = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    said.append({"code": code or 0, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(said))
"""

TRAIN_EXTRA_COMMANDS = [
    ["train", "--preset", "digits-tiny", "--steps", "1"],
    ["train-classifier", "--epochs", "1"],
    ["bench", "--per-class", "1", "--steps", "2"],
]


@pytest.mark.slow
def test_the_cli_without_the_train_extra_generates_and_names_the_extra(tmp_path: Path) -> None:
    """On a base install: generate works, every training command's --help works, and each
    training command itself exits 2 in one line naming the extra, with no traceback."""
    png = tmp_path / "g.png"
    generate = ["generate", "--model", "random:digits-tiny", "--steps", "2", "--out", str(png)]
    helps = [[args[0], "--help"] for args in TRAIN_EXTRA_COMMANDS]
    runs = [[*args, "--out", str(tmp_path / args[0])] for args in TRAIN_EXTRA_COMMANDS]
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_TRAIN_EXTRA, json.dumps([generate, *helps, *runs])],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    generated, *said = json.loads(proc.stdout.strip().splitlines()[-1])
    assert generated["code"] == 0, generated["stderr"]
    with Image.open(png) as image:
        assert image.format == "PNG"
    for run_, got in zip(helps + runs, said, strict=True):
        if run_[1] == "--help":
            assert got["code"] == 0 and "--out" in got["stdout"], got
            continue
        assert got["code"] == 2, got
        lines = got["stderr"].strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in got["stderr"], got
        assert lines[0].startswith(f'skipdit {run_[0]}: error: needs the "train" extra')
        assert 'pip install -e ".[train]"' in lines[0]
        assert not (tmp_path / run_[0]).exists() or run_[0] == "train"


@pytest.mark.slow
def test_generate_on_a_text_model_says_when_the_prompt_was_cut(tmp_path: Path) -> None:
    model = str(tiny_text_model(tmp_path / "t2i"))
    long = "a 7 on the left and a 2 on the right and a 3 at the top"  # past its 8 tokens
    out = tmp_path / "t2i.png"
    said = run("generate", "--model", model, "--prompt", long, "--steps", "2", "--out", str(out))
    assert said.returncode == 0, said.stderr
    assert "prompt: 8 tokens (TRUNCATED at the model's 8 tokens)" in said.stdout.splitlines()
    with Image.open(out) as image:
        assert image.size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)  # 4 images of 32x32
    stats = run("generate", "--model", model, "--prompt", "a 7", "--negative-prompt", "a 3",
                "--steps", "2", "--out", str(out), "--json")  # fmt: skip
    assert stats.returncode == 0, stats.stderr
    got = json.loads(stats.stdout.strip().splitlines()[-1])
    assert (got["prompt_tokens"], got["prompt_truncated"]) == (3, False)
    assert (got["negative_prompt_tokens"], got["negative_prompt_truncated"]) == (3, False)
    refused = run("generate", "--model", model, "--class-label", "3", "--out", str(out))
    assert refused.returncode == 2  # checked before the model and its encoder load: one line
    assert refused.stderr.strip().splitlines() == [
        "skipdit generate: error: class_label: this model is text-conditional: give a prompt"
    ]
