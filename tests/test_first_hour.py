"""A new user's first hour (issue 16): the README's commands, what the demo prints, the model
a run names, which Ray it uses, and mistakes that must stop with one line instead of running.

The CLI runs in a subprocess where a user would type it, from the clone's root, with a PATH
that does not contain the virtual environment (a fresh shell that never activated it).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import httm_dist.cluster.driver as driver
from httm_dist.cli import main
from httm_dist.config import demo_config, load_config

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def fresh_shell_env() -> dict:
    """The environment of a new terminal: no activated venv, its bin folder not on PATH."""
    venv_bin = str(Path(sys.executable).parent)
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "RAY_ADDRESS")}
    return {**env, "PATH": os.pathsep.join(path or ["/usr/bin", "/bin"])}


def cli_command() -> list[str]:
    """``.venv/bin/httm-dist`` as the README calls it (``python -m httm_dist.cli`` when this
    Python has no such script, e.g. a system install)."""
    script = Path(sys.executable).parent / "httm-dist"
    return [str(script)] if script.exists() else [sys.executable, "-m", "httm_dist.cli"]


def run_cli(*args: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*cli_command(), *args], capture_output=True, text=True, cwd=cwd,
                          env=fresh_shell_env(), timeout=timeout, preexec_fn=lambda: os.umask(0o022))


def bash_blocks(text: str) -> list[list[str]]:
    """Command lines of each ```bash block (comments and blank lines dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [[ln.strip() for ln in b.splitlines() if ln.strip() and not ln.strip().startswith("#")]
            for b in blocks]


# --------------------------------------------------------------------------- items 1, 2


def test_readme_install_is_two_commands_and_ci_runs_the_second():
    blocks = bash_blocks(README)
    demo, tests = blocks[0], blocks[1]
    assert demo == ["python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && "
                    ".venv/bin/pip install -e . && .venv/bin/httm-dist demo"]
    assert len(tests) == 1 and tests[0].endswith(".venv/bin/python -m pytest -q")
    # .ci/run runs the same steps, in order (with an optional step of its own in between)
    ci = (REPO / ".ci" / "run").read_text()
    at = 0
    for step in (part.strip() for part in tests[0].split("&&")):
        found = ci.find(step, at)
        assert found >= 0, (step, ci)
        at = found + len(step)


def test_readme_calls_every_local_program_through_the_venv():
    """No bare ``httm-dist``/``python``/``pip`` that a fresh shell would not find; the
    cluster line (``ray job submit -- python ...``) runs on the cluster's Python; a block that
    starts by activating the venv (the local Ray head: its jobs take ``python`` from the PATH
    of the shell that ran ``ray start``) calls plain names."""
    for block in bash_blocks(README):
        if block[0].startswith("source .venv/bin/activate"):
            continue
        for line in block:
            for part in re.split(r"&&|\|\|", line):
                words = shlex.split(part)
                if words[:3] == ["ray", "job", "submit"] or words[:1] == ["python3"]:
                    continue
                assert words[0].startswith(".venv/bin/"), line
    # inline commands in the prose too (the CPU torch line, huggingface_hub)
    spans = [c for c in re.findall(r"`([^`\n]+)`", README) if " " in c]
    commands = [c for c in spans if re.match(r"(\.venv/bin/)?(pip|python|httm-dist)\b", c)]
    assert len(commands) >= 3, commands
    for cmd in commands:
        assert cmd.startswith(".venv/bin/"), cmd
    assert "source .venv/bin/activate" in README


def test_readme_ray_job_lines_write_where_the_job_survives():
    """``ray job submit --working-dir .`` runs the job in Ray's temporary copy of the folder:
    each submit line's output is a bucket URL or an absolute path, and the local head is
    started from the activated venv with the token auth that Ray 2.60 wants."""
    submits = [ln for block in bash_blocks(README) for ln in block if ln.startswith("ray job submit")]
    assert len(submits) >= 2, submits
    for line in submits:
        (output,) = [w.split("=", 1)[1] for w in shlex.split(line) if w.startswith("output=")]
        assert "://" in output or output.startswith("$PWD/"), line
    (local,) = [b for b in bash_blocks(README) if any(ln.startswith("ray start") for ln in b)]
    assert local[0] == "source .venv/bin/activate && export RAY_AUTH_MODE=token", local
    assert local[-1] == "ray stop" and "--address http://127.0.0.1:8265" in local[2]


def test_readme_says_what_the_torch_pin_pulls_and_how_to_get_cpu_torch():
    assert "CUDA build" in README and "nvidia-*" in README
    assert ".venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in README


def test_demo_from_a_fresh_shell_and_every_printed_command(tmp_path):
    """The README's demo command reaches committed scenes; every command it prints runs as
    printed in a fresh shell from the clone (reading with pandas and httm_dist.results, the
    preview, and the same job from configs/local-tiny-demo.yaml, which finds it all done);
    outputs follow the umask; the driver names the model and the private local Ray it starts."""
    root = tmp_path / "demo"
    proc = run_cli("demo", "--root", str(root), "--scenes", "1", "--frames", "3", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 done, 0 failed" in proc.stdout
    assert "model: preset 'tiny-synthetic'" in proc.stderr and "3.3M parameters" in proc.stderr
    assert "starting a private local Ray" in proc.stderr
    printed = [ln.strip() for ln in proc.stdout.splitlines() if ln.startswith("  ")
               and re.search(r"(^|/)(python[0-9.]*|httm-dist)$", ln.split()[0])]
    assert len(printed) == 4, proc.stdout  # pandas, results, preview, run
    outputs = {}
    for cmd in printed:
        ran = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=REPO,
                             env=fresh_shell_env(), timeout=300,
                             preexec_fn=lambda: os.umask(0o022))
        assert ran.returncode == 0, (cmd, ran.stderr[-3000:])
        outputs[cmd] = ran.stdout
    pandas_out = next(v for k, v in outputs.items() if "read_parquet" in k)
    assert "scene_000" in pandas_out and "depth_median" in pandas_out
    rerun = next(v for k, v in outputs.items() if " run configs/local-tiny-demo.yaml" in k)
    assert "0 done, 0 failed, 1 already committed" in rerun
    files = [p for p in (root / "output").rglob("*") if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in files), \
        {str(p): oct(p.stat().st_mode) for p in files}


# --------------------------------------------------------------------------- item 9: the demo is its config


def test_demo_runs_exactly_configs_local_tiny_demo(tmp_path):
    root = tmp_path / "d"
    from_file = load_config(REPO / "configs" / "local-tiny-demo.yaml",
                            [f"input={root / 'scenes'}", f"output={root / 'output'}"])
    assert demo_config(root).to_dict() == from_file.to_dict()


# --------------------------------------------------------------------------- item 3


def test_random_weights_need_an_explicit_opt_in(tmp_path):
    """A config with only input and output (preset vggt-1b, no weights) is a config error
    in the CLI, before anything runs; the opt-in makes it valid."""
    (tmp_path / "scenes" / "s0").mkdir(parents=True)
    job = tmp_path / "job.yaml"
    job.write_text(f"input: {tmp_path / 'scenes'}\noutput: {tmp_path / 'out'}\n")
    proc = run_cli("run", str(job), cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "'vggt-1b' ships no weights" in lines[0]
    assert "model.allow_random_weights" in lines[0] and "model.weights" in lines[0]
    assert not (tmp_path / "out").exists()
    cfg = load_config(job, ["model.allow_random_weights=true"])
    assert cfg.model.allow_random_weights and cfg.model.weights is None


def test_every_run_names_its_model_on_the_driver(tmp_path, caplog, monkeypatch):
    """Preset, weights source, parameter count (meta device), device and merging, logged
    before any work; a random-weight run says so as a warning."""
    caplog.set_level(logging.INFO, logger="httm_dist")
    cfg = load_config({"input": str(tmp_path), "output": str(tmp_path / "out"),
                       "model": {"allow_random_weights": True},
                       "merging": {"strategy": "uniform", "q_keep": 0.4, "kv_keep": 0.6}})
    monkeypatch.setattr(driver, "plan_work", lambda *a: (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.raises(RuntimeError, match="stop"):
        driver.run_job(cfg, progress=False)
    (rec,) = [r for r in caplog.records if r.message.startswith("model: ")]
    assert rec.levelno == logging.WARNING and "RANDOM weights" in rec.message
    for part in ("preset 'vggt-1b'", "1190.6M parameters", "device auto",
                 "merging uniform (q_keep=0.4, kv_keep=0.6, min_tokens=40000)"):
        assert part in rec.message, (part, rec.message)
    line = driver.describe_model(demo_config(tmp_path))
    assert "weights shipped with the package" in line and "layout prior" in line
    assert "not geometry" in line and "device cpu" in line
    # the demo's scenes are short: it merges every layer rather than falling back to dense
    assert "merging httm (q_keep=0.5, kv_keep=0.5, min_tokens=0)" in line


# --------------------------------------------------------------------------- item 10


@pytest.mark.parametrize(
    "address, env, want, says",
    [
        (None, None, "local", "private local Ray"),
        ("auto", None, "auto", "from ray.address"),
        (None, "ray://head:10001", "ray://head:10001", "from RAY_ADDRESS"),
        ("127.0.0.1:6379", "ray://other:1", "127.0.0.1:6379", "from ray.address"),
    ],
)
def test_ray_joins_a_cluster_only_when_asked(tmp_path, monkeypatch, caplog, address, env, want, says):
    calls = []
    monkeypatch.setattr(driver.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(driver.ray, "init", lambda **kw: calls.append(kw))
    if env:
        monkeypatch.setenv("RAY_ADDRESS", env)
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    caplog.set_level(logging.INFO, logger="httm_dist")
    cfg = demo_config(tmp_path, [f"ray.address={address}"] if address else [])
    assert driver._connect(cfg) is True
    assert [c["address"] for c in calls] == [want]
    assert says in caplog.text


# --------------------------------------------------------------------------- items 5, 9: no silent no-ops


def _image(path: Path, seed: int, fmt: str | None = None) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (42, 56, 3), dtype=np.uint8)).save(path, format=fmt)


def test_one_folder_of_images_is_one_scene_and_every_pillow_format_is_a_frame(tmp_path, caplog):
    from httm_dist.data import discover_scenes

    shot = tmp_path / "shot_7"
    _image(shot / "f1.tif", 1)
    _image(shot / "f2.bmp", 2)
    _image(shot / "f10.PNG", 3)
    _image(shot / "f3.gif", 4)
    (shot / "notes.txt").write_text("not an image")
    (shot / "cams.json").write_text("{}")
    caplog.set_level(logging.INFO, logger="httm_dist")
    (scene,) = discover_scenes(str(shot))
    assert scene.scene_id == "shot_7"
    assert [f.name for f in scene.frames] == ["f1.tif", "f2.bmp", "f3.gif", "f10.PNG"]
    assert "reading it as one scene 'shot_7'" in caplog.text
    assert "scene 'shot_7': skipped 2 files that are not images Pillow reads (1 .json, 1 .txt)" in caplog.text


def test_a_scene_without_readable_images_names_the_formats(tmp_path):
    from httm_dist.data import discover_scenes, read_scene_frames
    from httm_dist.errors import SceneError

    (tmp_path / "in" / "a").mkdir(parents=True)
    (tmp_path / "in" / "a" / "x.raw").write_bytes(b"\0" * 10)
    (scene,) = discover_scenes(str(tmp_path / "in"))
    with pytest.raises(SceneError, match=r"no image frames .*\.tif, \.bmp.*formats Pillow reads"):
        read_scene_frames(scene)


@pytest.mark.parametrize("layout", ["empty", "only-filtered"])
def test_an_input_with_no_scene_exits_2(tmp_path, layout):
    (tmp_path / "in").mkdir()
    extra = []
    if layout == "only-filtered":
        _image(tmp_path / "in" / "a" / "f.png", 0)
        extra = ["--set", "include=[zzz*]"]
    job = tmp_path / "job.yaml"
    job.write_text(f"input: {tmp_path / 'in'}\noutput: {tmp_path / 'out'}\n"
                   "model: {preset: tiny-synthetic, device: cpu}\n")
    proc = run_cli("run", str(job), *extra, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("httm-dist:")]
    assert "holds no scene" in line and str(tmp_path / "in") in line
    assert ("include/exclude" in line) == (layout == "only-filtered")
    assert "Traceback" not in proc.stderr


def test_results_open_on_a_missing_path_raises(tmp_path):
    import httm_dist.results as results

    with pytest.raises(FileNotFoundError, match="no results at .*typo.*does not exist"):
        results.open(str(tmp_path / "typo"))
    assert main(["preview", str(tmp_path / "typo"), "s"]) == 2


@pytest.mark.ray
def test_folder_of_images_with_its_output_inside_runs_and_reruns(ray_session, tmp_path, caplog):
    """``input`` is one scene's folder of TIFF/BMP frames and ``output`` a folder inside it:
    the scene is processed; the rerun skips the output folder (logged) instead of reading it
    as a scene (or its preview PNGs as frames), and finds the scene committed."""
    import httm_dist.results as results

    shot = tmp_path / "shot"
    for i, fmt in enumerate(["tif", "bmp", "tif"]):
        _image(shot / f"f{i}.{fmt}", i)
    args = ["run", str(REPO / "configs" / "local-tiny-demo.yaml"), "--no-progress",
            "--set", f"input={shot}", "--set", f"output={shot / 'out'}", "--set", "preview=true"]
    caplog.set_level(logging.INFO, logger="httm_dist")
    assert main(args) == 0
    res = results.open(str(shot / "out"))
    assert res.scene_ids == ["shot"] and res.frames().num_rows == 3
    caplog.clear()
    assert main(args) == 0
    assert "it is this job's output, not a scene" in caplog.text
    last = results.open(str(shot / "out")).runs()[-1]
    assert (last["skipped"], last["done"], last["failed"]) == (1, 0, 0)


# --------------------------------------------------------------------------- item 7


@pytest.fixture
def weights_job(tmp_path):
    _image(tmp_path / "in" / "a" / "f.png", 0)

    def write(weights: Path, preset: str = "tiny") -> Path:
        job = tmp_path / "job.yaml"
        job.write_text(f"input: {tmp_path / 'in'}\noutput: {tmp_path / 'out'}\n"
                       f"model: {{preset: {preset}, device: cpu, weights: {weights}}}\n")
        return job

    return write


def _assert_one_line(stderr: str, *needles: str) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and len(lines[0]) < 600 and "Traceback" not in stderr, stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_weights_of_another_architecture_one_line_exit_2_before_any_scene(weights_job, tmp_path):
    """The CLI as a user runs it: the official-size preset given the tiny fixture's weights."""
    fixture = REPO / "tests" / "fixtures" / "vggt_tiny" / "weights.safetensors"
    proc = run_cli("run", str(weights_job(fixture, preset="vggt-1b")), cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    _assert_one_line(proc.stderr, str(fixture), "does not fit preset 'vggt-1b'", "shape mismatches",
                     "set model.preset")
    assert not (tmp_path / "out" / "scenes").exists()


@pytest.mark.parametrize("name, content, needle", [
    ("w.bin", b"\0" * 64, "has the suffix '.bin'"),
    ("w.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!", "not a readable .safetensors checkpoint"),
    ("w.pt", b"PK\x03\x04 this is no zip", "not a readable .pt checkpoint"),
    ("truncated.safetensors", None, "truncated"),
])
def test_weights_mistakes_one_line_exit_2(weights_job, tmp_path, capsys, name, content, needle):
    path = tmp_path / name
    if content is None:  # the first half of a real checkpoint: an interrupted download
        full = (REPO / "tests" / "fixtures" / "vggt_tiny" / "weights.safetensors").read_bytes()
        content = full[: len(full) // 2]
    path.write_bytes(content)
    assert main(["run", str(weights_job(path))]) == 2
    _assert_one_line(capsys.readouterr().err, str(path), needle)
    assert not (tmp_path / "out" / "scenes").exists()


# --------------------------------------------------------------------------- item 8


def test_input_fingerprint_follows_the_frames(tmp_path):
    import tarfile

    from httm_dist.data import discover_scenes, scene_fingerprint

    root = tmp_path / "in"
    for i in range(3):
        _image(root / "a" / f"f{i}.png", i)
    _image(root / "b" / "f0.png", 9)

    def prints(**kw):
        return {s.scene_id: scene_fingerprint(s) for s in discover_scenes(str(root), **kw)}

    first = prints()
    assert prints() == first  # nothing changed: same fingerprints
    _image(root / "a" / "f3.png", 3)  # a frame added
    added = prints()
    assert added["a"] != first["a"] and added["b"] == first["b"]
    os.utime(root / "b" / "f0.png", (1e9, 1e9))  # a frame rewritten (new mtime)
    assert prints()["b"] != added["b"]
    assert prints(max_frames=2)["a"] != prints()["a"]  # other frames kept
    with tarfile.open(root / "c.tar", "w") as tar:
        tar.add(root / "b" / "f0.png", arcname="f0.png")
    before = prints()["c"]
    with tarfile.open(root / "c.tar", "w") as tar:
        tar.add(root / "a" / "f1.png", arcname="f0.png")
    os.utime(root / "c.tar", (2e9, 2e9))
    assert prints()["c"] != before  # the archive was rewritten


def test_demo_rewrites_its_scenes_only_when_its_parameters_change(tmp_path):
    from httm_dist.cli import _demo_dataset

    calls = []

    def make(folder, **params):
        calls.append(params)
        for i in range(params["num_frames"]):
            _image(Path(folder) / "scene_000" / f"{i:03d}.png", i)

    folder = tmp_path / "scenes"
    params = dict(num_scenes=1, num_frames=4, height=42, width=56, seed=0)
    _demo_dataset(folder, make, **params)
    _demo_dataset(folder, make, **params)  # rerun: the same scenes, untouched
    assert len(calls) == 1
    _demo_dataset(folder, make, **{**params, "num_frames": 2})  # fewer frames: none left over
    assert len(calls) == 2 and len(list((folder / "scene_000").iterdir())) == 2


@pytest.mark.ray
def test_rerun_reprocesses_a_scene_whose_inputs_changed(ray_session, tmp_path, caplog):
    import httm_dist.results as results

    root = tmp_path / "in"
    for sid in ("a", "b"):
        for i in range(2):
            _image(root / sid / f"f{i}.png", i + (sid == "b") * 10)
    args = ["run", str(REPO / "configs" / "local-tiny-demo.yaml"), "--no-progress",
            "--set", f"input={root}", "--set", f"output={tmp_path / 'out'}"]
    assert main(args) == 0
    before = results.open(str(tmp_path / "out")).records("done")
    assert all(len(r["input_fingerprint"]) == 64 for r in before.values())
    _image(root / "a" / "f2.png", 2)  # scene a gains a frame
    caplog.set_level(logging.INFO, logger="httm_dist")
    assert main(args) == 0
    assert "scene 'a': its inputs changed since it was committed (2 frames then, 3 now" in caplog.text
    res = results.open(str(tmp_path / "out"))
    last = res.runs()[-1]
    assert (last["done"], last["skipped"]) == (1, 1)
    assert res.records("done")["a"]["num_frames"] == 3
    assert res.records("done")["b"] == before["b"]  # untouched
    assert res.frames(["a"]).num_rows == 3
