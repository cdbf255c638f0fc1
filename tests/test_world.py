"""The default world ships with the repository: a rebuild comes close to it and never writes over it."""
import json
import os
import subprocess
import sys

import torch

import world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "default_world")


def shipped_info():
    with open(os.path.join(SHIPPED, "world.json")) as f:
        return json.load(f)


def snapshot(folder):
    """Every file under folder with its bytes."""
    out = {}
    for d, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(d, name), "rb") as f:
                out[os.path.relpath(os.path.join(d, name), folder)] = f.read()
    return out


def test_the_shipped_world_is_the_one_the_code_describes():
    assert world.SHIPPED == SHIPPED
    assert shipped_info()["settings"] == json.loads(json.dumps(world.SETTINGS))
    for name in ("policy", "teacher", "student"):
        assert os.path.getsize(os.path.join(SHIPPED, name, "model.safetensors")) < 500_000


def test_a_rebuild_comes_within_two_points_of_the_shipped_world(tmp_path):
    """The build is code, so anyone can check the shipped weights: a build here (its own CPU's kernels)
    gives a teacher and a student as accurate as the shipped ones, within 0.02, on held-out oracle pairs."""
    with torch.random.fork_rng(devices=[]):
        info = world.build(str(tmp_path))
    want = shipped_info()
    for key in ("teacher_accuracy", "student_accuracy"):
        assert abs(info[key] - want[key]) <= 0.02, (key, info[key], want[key])
    assert info["parameters"] == want["parameters"]


def test_rebuild_writes_to_the_cache_never_over_the_shipped_files(tmp_path, monkeypatch):
    before = snapshot(SHIPPED)
    built = []

    def fake_build(folder):  # the real build takes a minute; where it writes is what is tested here
        built.append(folder)
        open(os.path.join(folder, "world.json"), "w").write("{}")
        return {"teacher_accuracy": 0.0, "student_accuracy": 0.0}

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(world, "build", fake_build)
    folder = world.rebuild()
    assert folder == str(tmp_path / "tsalign" / "world") and os.path.exists(os.path.join(folder, "world.json"))
    assert not os.path.abspath(built[0]).startswith(SHIPPED)
    assert snapshot(SHIPPED) == before
    # The script refuses the shipped folder, and any folder that already exists.
    for target in (SHIPPED, str(tmp_path)):
        r = subprocess.run([sys.executable, "world.py", target], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode != 0 and "world.py" in r.stderr
    assert snapshot(SHIPPED) == before
