"""The default world's cache: a world built by other code is never reused."""
import importlib.util
import os
import shutil
import subprocess
import sys

import world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def loaded_project_modules(folder):
    """The project's own modules (files in folder) that `import world` loads, run in a fresh interpreter."""
    code = ("import os, sys; import world; here = os.path.abspath('.'); "
            "print(' '.join(sorted(os.path.basename(m.__file__) for m in list(sys.modules.values()) "
            "if os.path.isabs(getattr(m, '__file__', None) or '') and os.path.dirname(m.__file__) == here)))")
    return subprocess.run([sys.executable, "-c", code], cwd=folder, check=True, capture_output=True,
                          text=True).stdout.split()


def world_in(folder):
    """world.py loaded from a copy in folder: its cache_key() hashes the modules in that folder."""
    spec = importlib.util.spec_from_file_location("world_copy", os.path.join(folder, "world.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cache_key_hashes_every_module_the_build_runs():
    assert sorted(loaded_project_modules(ROOT)) == sorted(world.BUILD_MODULES)


def test_a_change_in_any_build_module_changes_the_cache_key(tmp_path):
    for name in world.BUILD_MODULES:
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    copy = world_in(tmp_path)
    before = copy.cache_key()
    assert before == world.cache_key()
    for name in world.BUILD_MODULES:
        with open(tmp_path / name, "a") as f:
            f.write("\n# changed\n")
        after = copy.cache_key()
        assert after != before, name
        before = after
