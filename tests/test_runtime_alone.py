"""The runtime stands alone: the files the Dockerfile copies import and write a speech without torch or export/.

import-linter (pyproject.toml) checks the imports statically; this runs them the way the image does,
from a copy of exactly what the Dockerfile's COPY lines take, with torch made unimportable.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from bot.inference.ending import ELLIPSIS, SENTENCE_END

ROOT = Path(__file__).resolve().parents[1]

# Run in the copy: torch and export refuse to import, then every bot/ and db/ module is imported and
# `speechbot generate` writes a speech.
PROBE = """
import importlib, importlib.abc, pkgutil, runpy, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "export"):
            raise ModuleNotFoundError(f"{name} is not in the runtime image", name=name)

sys.meta_path.insert(0, Refuse())
for package in ("bot", "db"):
    for module in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
        importlib.import_module(module.name)
print("imported", len([name for name in sys.modules if name.split(".")[0] in ("bot", "db")]), "modules")
sys.argv = ["speechbot", "generate", "--length", "60", "--seed", "3"]
runpy.run_module("bot", run_name="__main__")
"""


def copy_like_the_dockerfile(destination: Path) -> list[str]:
    """Copy what the Dockerfile's COPY lines take into `destination` (its WORKDIR); returns what was copied."""
    copied = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not line.startswith("COPY "):
            continue
        *sources, target = shlex.split(line)[1:]
        for source in sources:
            into = destination / target / Path(source).name if target.endswith("/") else destination / target
            into.parent.mkdir(parents=True, exist_ok=True)
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, into, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(ROOT / source, into)
            copied.append(source)
    return copied


def test_the_images_files_run_without_torch_or_export(tmp_path):
    copied = copy_like_the_dockerfile(tmp_path)
    assert {"bot", "db"} <= set(copied) and "export" not in copied
    # -S: no site-packages .pth files, so the editable install cannot reach back into the repository;
    # the installed libraries (torch among them, refused by the probe) stay importable through the path.
    libraries = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    env = {"PYTHONPATH": ":".join([str(tmp_path), *libraries]), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-S", "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    imported, speech = result.stdout.split("\n", 1)
    assert int(imported.split()[1]) >= 10
    # The bot's sampling and ending: about 60 characters (bot.inference.ending.SLACK), ending at a sentence, or at a
    # word with "…" where no sentence ends that near.
    assert 0.75 * 60 <= len(speech.rstrip("\n")) <= 1.25 * 60, speech
    assert re.search(rf"({SENTENCE_END}|{ELLIPSIS})$", speech.rstrip()), speech


def test_settings_and_commands_load_without_the_engine():
    code = (
        "import sys, bot.config, bot.core.speechbot; "
        "loaded = {'onnxruntime', 'onnx', 'bot.inference.engine', 'bot.inference.runner'} & set(sys.modules); "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
