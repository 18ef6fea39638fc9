"""Every experiment script and benchmark runs end to end at its ``--smoke`` size, so a broken one is caught.

Each case runs ``python <script> --smoke --out <tmp>`` as a subprocess (from the repository root) and checks
that it exits with status 0 and wrote its result: JSON that parses and says ``"smoke": true``, and the PNG
where the script draws one. ``--smoke`` is each script's smallest size that still runs every stage (seconds
each); its numbers mean nothing. The programs are tiny, so XLA compiles them with its cheaper CPU backend
passes (``XLA_FLAGS`` below): compilation is most of a smoke run's time. The cases run one after another;
the whole file takes 3 to 4 minutes on 2 CPU cores.

A second, static check: the scripts import only the ``metagrad`` and ``replay`` packages and third-party
libraries (never another script, never through ``sys.path``).
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"

# XLA's cheaper CPU code generation (no LLVM optimization, no fusion emitters): smoke runs are compile-bound, and
# these flags make them about 1.7x faster (the same computations, less optimized machine code)
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_use_fusion_emitters=false")

# script (relative to experiments/) -> (the files it writes, relative to --out: JSON first, then any PNG;
# --out is a folder for the experiments and the JSON file itself for the benchmarks, "" below)
SCRIPTS = {
    "data_poisoning.py": ("summary.json", "mnist1d_mlp/poisoning.png"),
    "data_selection.py": ("summary.json", "mnist1d_mlp/data_selection.png"),
    "dga_mixing.py": ("result_smoke.json", "dga_mixing_smoke.png"),
    "hyperflow.py": ("result.json", "hyperflow.png"),
    "learning_transfer.py": ("result.json", "learning_transfer.png"),
    "lm_schedule.py": ("result.json", "lr_schedule.png"),
    "lr_schedule.py": ("summary.json", "lr_schedule.png"),
    "metasmoothness.py": ("result.json", "metasmoothness.png"),
    "benchmarks/conv1d_impl.py": ("",),
    "benchmarks/data_size.py": ("",),
    "benchmarks/hyperflow_depth.py": ("",),
    "benchmarks/interactive_load.py": ("",),
    "benchmarks/inner_grad_modes.py": ("",),
    "benchmarks/replay_demo_problem.py": ("",),
    "benchmarks/replay_long_run.py": ("",),
    "benchmarks/replay_vs_peers.py": ("",),
    "benchmarks/transfer_matching.py": ("",),
}
TIMEOUT_S = 300


def test_every_script_is_listed():
    found = {p.relative_to(EXPERIMENTS).as_posix() for p in [*EXPERIMENTS.glob("*.py"),
                                                              *EXPERIMENTS.glob("benchmarks/*.py")]}
    assert found == set(SCRIPTS), "add the new script (and the files its --smoke run writes) to SCRIPTS"


@pytest.mark.parametrize("script", sorted(SCRIPTS), ids=lambda s: pathlib.Path(s).stem)
def test_smoke_run(script, tmp_path):
    path = EXPERIMENTS / script
    outputs = SCRIPTS[script]
    benchmark = outputs == ("",)
    out = tmp_path / (f"{path.stem}.json" if benchmark else "out")
    argv = [sys.executable, str(path), "--smoke", "--out", str(out)]
    if "--no-progress" in path.read_text():
        argv.append("--no-progress")
    env = {**os.environ, "MPLBACKEND": "Agg",
           "XLA_FLAGS": " ".join(f for f in (FAST_COMPILE, os.environ.get("XLA_FLAGS")) if f),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    env.setdefault("JAX_PLATFORMS", "cpu")
    try:
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{script} --smoke ran past {TIMEOUT_S} s; output so far:\n{err.stdout}\n{err.stderr}")
    assert proc.returncode == 0, f"{script} --smoke failed (status {proc.returncode}):\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-6000:]}"
    files = [out] if benchmark else [out / name for name in outputs]
    for file in files:
        assert file.is_file() and file.stat().st_size > 0, f"{script} --smoke did not write {file.name}"
    result = json.loads(files[0].read_text())
    assert result.get("smoke") is True, f"{files[0].name} does not record that it is a smoke run"
    for png in files[1:]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png.name} is not a PNG"


def _imported_modules(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield "." * node.level + (node.module or "")


@pytest.mark.parametrize("script", sorted(SCRIPTS), ids=lambda s: pathlib.Path(s).stem)
def test_imports_only_packages(script):
    """No script reaches another through ``sys.path`` or imports it: shared code lives in metagrad or replay."""
    source = (EXPERIMENTS / script).read_text()
    tree = ast.parse(source)
    uses_sys_path = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "path"
                     and isinstance(n.value, ast.Name) and n.value.id == "sys"]
    assert not uses_sys_path, f"{script} uses sys.path (lines {uses_sys_path})"
    others = {pathlib.Path(s).stem for s in SCRIPTS}
    bad = [m for m in _imported_modules(tree) if m.startswith(".") or m.split(".")[0] in others | {"experiments"}]
    assert not bad, f"{script} imports another script: {bad}"
