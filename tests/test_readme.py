"""Every command README.md shows runs as written (with small models where the README's are large).

The README's ```bash blocks are split into commands (a line, its trailing ``# comment`` dropped, ``&&``
parts run in order) and its ```python blocks are run in order in one session, in a temporary folder that holds links to
the repository's ``examples/``, ``benchmarks/`` and ``tests/``, so that outputs (``out/...``) never land in
the tree. ``qlfx ...`` commands run in this process through ``qlfx.cli.main`` (the console script's entry
point; it saves a torch import per command), everything else in a shell. A command that exits non-zero
fails the test, with its output.

Substitutions (README -> test), so that the default run stays small:

=====================================  ==================================================================
``qlnet50``, ``qlnet-eq3``             ``qlnet-tiny``, ``qlnet-eq3-tiny`` (32x32 inputs)
``MODEL``                              ``qlnet-tiny``
``--passes a,b``                       ``--passes fold-bn,dce``
``path/to/my_model.py:build``          a file the test writes: ``build()`` returns the zoo's qlnet-tiny
``--input-shape 1,3,224,224``          ``--input-shape 1,3,32,32``
``my_passes.py``                       a file the test writes: registers ``my-pass`` (changes nothing)
``--tune-trials 16`` / ``--trials 16`` ``2``
``qlfx bench``                         ``--batch 1``, ``--seconds 0.2 --blocks 1`` added
``python3 benchmarks/models.py``       ``--quick``;  ``benchmarks/compile.py``: ``--model qlnet-tiny --rounds 1``
Python: ``qlnet50()``, 224x224 input   ``create_model("qlnet-tiny")``, 32x32
=====================================  ==================================================================

Left out: ``pip install`` (the environment is installed), ``python3 -m pytest ...`` (this suite itself)
and the stress run. Commands that build TVM modules, run the examples or benchmarks, or take long for
another reason are ``slow`` (``pytest -m slow tests/test_readme.py``); the default run keeps a
representative set: listing, running and emitting ONNX, dumping stages with calibration inputs, diffing,
comparing (random and file inputs), benchmarking an artifact, and the Python blocks. The calibration file the README's prose makes with
``python3 -c "...np.save('out/calib.npy', ...)"`` is made by that very command (shape substituted).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from blocks import one_torch_thread  # noqa: F401  (autouse fixture: one torch thread)

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

SUBSTITUTIONS = [  # (regex, replacement), applied in order
    (r"\bqlnet50\b", "qlnet-tiny"),
    (r"\bqlnet-eq3\b(?!-)", "qlnet-eq3-tiny"),
    (r"\bMODEL\b", "qlnet-tiny"),
    (r"--passes a,b\b", "--passes fold-bn,dce"),
    (r"--input-shape 1,3,224,224", "--input-shape 1,3,32,32"),
    (r"--tune-trials 16\b", "--tune-trials 2"),
    (r"--trials 16\b", "--trials 2"),
    (r"(qlfx bench .*)--seconds [0-9.]+", r"\1--seconds 0.2 --blocks 1"),
    (r"(qlfx bench (?!.*--seconds)\S+)", r"\1 --seconds 0.2 --blocks 1"),
    (r"--batch 1,8", "--batch 1"),
    (r"(benchmarks/models\.py)", r"\1 --quick"),
    (r"(benchmarks/compile\.py)", r"\1 --model qlnet-tiny --rounds 1"),
]
PY_SUBSTITUTIONS = [
    (r"from qlfx\.models import qlnet50", "from qlfx.models import create_model"),
    (r"\bqlnet50\(\)", 'create_model("qlnet-tiny")'),
    (r"torch\.randn\(1, 3, 224, 224\)", "torch.randn(1, 3, 32, 32)"),
]
SKIPPED = (r"^python3 -m pip install\b", r"^python3 -m pytest\b", r"^QLFX_STRESS=")
SLOW = (r"\btvm\b", r"\.so\b", r"--tune-trials", r"^python3 (examples|benchmarks)/", r"--dynamic-batch",
        r"path/to/my_model", r"--report", r"--load", r"--bisect", r"--print-changed", r"^qlfx symmetry")

MY_MODEL = "from qlfx.models import create_model\n\ndef build():\n    return create_model('qlnet-tiny').eval()\n"
MY_PASSES = '''from qlfx.pass_manager import Pass, PassResult, register_pass


@register_pass
class MyPass(Pass):
    name = "my-pass"; description = "README example: changes nothing"; contract = "exact"

    def run(self, gm, ctx):
        return PassResult(changed=False)
'''


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", README.read_text(), flags=re.S)


def substitute(text: str, table) -> str:
    for pattern, replacement in table:
        text = re.sub(pattern, replacement, text)
    return text


def commands() -> list[tuple[str, bool]]:
    """(command, slow) for every command of the README's bash blocks, substituted, in README order."""
    out = []
    for block in blocks("bash"):
        for line in block.splitlines():
            line = re.split(r"\s+#\s", line, maxsplit=1)[0].strip()
            if not line:
                continue
            parts = [p.strip() for p in line.split("&&")]
            parts = [p for p in parts if not any(re.search(s, p) for s in SKIPPED)]
            if not parts:
                continue
            command = " && ".join(substitute(p, SUBSTITUTIONS) for p in parts)
            out.append((command, any(re.search(s, command) for s in SLOW)))
    return out


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    for name in ("examples", "benchmarks", "tests"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "path" / "to").mkdir(parents=True)
    (tmp_path / "path" / "to" / "my_model.py").write_text(MY_MODEL)
    (tmp_path / "my_passes.py").write_text(MY_PASSES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # the calibration file, made by the README's own prose command
    prose = re.search(r"`(python3 -c \"import numpy as np; np\.save\('out/calib\.npy'.*?\")`", README.read_text())
    assert prose, "README lost its calibration example command"
    (tmp_path / "out").mkdir()
    _shell(prose.group(1).replace("224, 224", "32, 32"), tmp_path)
    return tmp_path


def _shell(command: str, cwd: Path) -> None:
    proc = subprocess.run(command, shell=True, cwd=cwd, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, f"README command failed ({proc.returncode}): {command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _run(command: str, cwd: Path, capsys) -> None:
    from qlfx.cli import main

    for part in command.split(" && "):
        argv = shlex.split(part)
        if argv[0] == "qlfx":
            code = main(argv[1:])
            captured = capsys.readouterr()
            assert code == 0, f"README command failed (exit {code}): {part}\n{captured.out[-3000:]}\n{captured.err[-3000:]}"
        else:
            _shell(part, cwd)


def _run_all(selected: list[str], cwd: Path, capsys) -> None:
    failures = []
    for command in selected:
        try:
            _run(command, cwd, capsys)
        except AssertionError as err:
            failures.append(str(err))
    assert not failures, "\n\n".join(failures)


def test_readme_has_the_commands_this_test_knows():
    listed = [c for c, _ in commands()]
    assert any(c.startswith("qlfx compare") for c in listed) and any(c.startswith("qlfx bench") for c in listed)
    assert len([c for c, slow in commands() if not slow]) >= 7
    assert len(blocks("python")) >= 2


def test_readme_commands(workdir, capsys):
    _run_all([c for c, slow in commands() if not slow], workdir, capsys)


@pytest.mark.slow
def test_readme_commands_all(workdir, capsys):
    _run_all([c for c, _ in commands()], workdir, capsys)


def test_readme_python_blocks(workdir):
    """The Python blocks run in README order in one session (as in a notebook: a later block may use what an
    earlier one imported or defined, e.g. ``model``), in one subprocess."""
    sources = [substitute(block, PY_SUBSTITUTIONS) for block in blocks("python")]
    (workdir / "readme_blocks.json").write_text(json.dumps(sources))
    (workdir / "run_blocks.py").write_text(
        "import json\nnamespace = {'__name__': '__main__'}\n"
        "for i, source in enumerate(json.load(open('readme_blocks.json'))):\n"
        "    exec(compile(source, f'README python block {i + 1}', 'exec'), namespace)\n")
    _shell(f"{shlex.quote(sys.executable)} run_blocks.py", workdir)
