"""The command line as a newcomer meets it: every ordinary mistake ends in one line saying what to change.

The cases run as real subprocesses (``python -m metagrad.cli ...``), all started at once by one fixture (each
costs about 3 s of imports, mostly jax), so the file stays well under a minute on 2 cores. Options are checked
in-process as well, without a subprocess each.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from metagrad import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# id -> (arguments, what the one-line message must contain); "{tmp}" is the case's scratch folder
CASES = {
    "audit_missing_data": (["audit-poison", "--data", "{tmp}/missing.npz"], ["--data", "no such file", "missing.npz"]),
    "audit_fraction_out_of_range": (["audit-poison", "--fraction", "1.5"], ["--fraction must be > 0 and < 1", "1.5"]),
    "audit_npz_without_x_y": (["audit-poison", "--data", "{tmp}/bad.npz", "--out", "{tmp}/audit"],
                              ["bad.npz holds arrays ['inputs']: it needs 'x' and 'y'"]),
    "demo_out_is_a_file": (["demo", "--out", "{tmp}/a_file"], ["--out", "is an existing file", "give a folder"]),
    "demo_negative_num_steps": (["demo", "--num-steps", "-5"], ["metagrad demo: --num-steps must be >= 1, got -5"]),
    "demo_k_1": (["demo", "--k", "1"], ["metagrad demo: --k must be >= 2, got 1"]),
    "replay_log_missing": (["replay-log", "{tmp}/missing.jsonl"], ["metagrad replay-log:", "no such file",
                                                                   "missing.jsonl"]),
    # a library ValueError raised while the command runs is printed as one line with status 2
    "replay_log_not_a_log": (["replay-log", "{tmp}/a_file"], ["metagrad replay-log:", "a_file:1 is not a JSON line"]),
    "interactive_without_extra": (["interactive", "--out", "{tmp}/interactive", "--port", "0"],
                                  ["metagrad interactive:", "[interactive] extra", "pip install -e '.[interactive]'",
                                   "pip install 'metagrad[interactive]'"]),
    "interactive_busy_port": (["interactive", "--out", "{tmp}/interactive", "--port", "{port}", "--num-steps", "2",
                               "--dataset", "blobs", "--exit-when-done"],
                              ["metagrad interactive: port {port} on 127.0.0.1 is in use", "--port 0"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case, run at once as a subprocess: id -> (returncode, stderr, seconds, scratch folder)."""
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # another program listening on the port
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(
        p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    procs = {}
    try:
        for name, (argv, _) in CASES.items():
            tmp = tmp_path_factory.mktemp(name)
            (tmp / "a_file").write_text("keep me\n")
            np.savez(tmp / "bad.npz", inputs=np.zeros((4, 3), np.float32))
            case_env = dict(env)
            if name == "interactive_without_extra":
                # a fastapi that fails to import, as when the [interactive] extra is not installed
                fake = tmp / "no_fastapi"
                fake.mkdir()
                (fake / "fastapi.py").write_text("raise ModuleNotFoundError(\"No module named 'fastapi'\")\n")
                case_env["PYTHONPATH"] = os.pathsep.join((str(fake), env["PYTHONPATH"]))
            args = [a.format(tmp=tmp, port=port) for a in argv]
            procs[name] = (subprocess.Popen([sys.executable, "-m", "metagrad.cli", *args], cwd=tmp, env=case_env,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
                           time.perf_counter(), tmp)
        results = {}
        for name, (proc, start, tmp) in procs.items():
            try:
                _, stderr = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, stderr = proc.communicate()
                stderr += "\n(timed out after 60 s)"
            results[name] = (proc.returncode, stderr, time.perf_counter() - start, tmp)
    finally:
        for proc, _, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
        busy.close()
    return results, port


@pytest.mark.parametrize("name", list(CASES))
def test_an_ordinary_mistake_gets_one_line_saying_what_to_change(runs, name):
    results, port = runs
    code, stderr, _, _ = results[name]
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    for needle in CASES[name][1]:
        assert needle.format(port=port) in lines[0], lines[0]


def test_mistakes_are_refused_before_any_work(runs):
    results, _ = runs
    # the file given as --out is left as it was; nothing was written for refused runs
    _, _, _, tmp = results["demo_out_is_a_file"]
    assert (tmp / "a_file").read_text() == "keep me\n" and sorted(os.listdir(tmp)) == ["a_file", "bad.npz"]
    for name in ("interactive_without_extra", "interactive_busy_port"):
        assert not (results[name][3] / "interactive").exists(), name  # the intervention log was not opened
    assert not (results["audit_npz_without_x_y"][3] / "audit").exists()
    assert results["interactive_busy_port"][2] < 45  # failed before building the problem or training


# ------------------------------------------------------------------------------------- in-process, no jax work
OPTION_ERRORS = [
    (["demo", "--meta-steps", "0"], "metagrad demo: --meta-steps must be >= 1, got 0"),
    (["demo", "--seed", "-1"], "metagrad demo: --seed must be >= 0, got -1"),
    (["demo", "--num-steps", "ten"], "metagrad demo: --num-steps must be an integer, got 'ten'"),
    (["audit-poison", "--fraction", "0"], "metagrad audit-poison: --fraction must be > 0 and < 1, got 0"),
    (["audit-poison", "--fraction", "1"], "metagrad audit-poison: --fraction must be > 0 and < 1, got 1"),
    (["audit-poison", "--eps", "0"], "metagrad audit-poison: --eps must be > 0, got 0"),
    (["audit-poison", "--eps", "inf"], "metagrad audit-poison: --eps must be a finite number, got 'inf'"),
    (["audit-poison", "--meta-steps", "0"], "metagrad audit-poison: --meta-steps must be >= 1, got 0"),
    (["audit-poison", "--seeds-per-step", "0"], "metagrad audit-poison: --seeds-per-step must be >= 1, got 0"),
    (["audit-poison", "--refine-steps", "-2"], "metagrad audit-poison: --refine-steps must be >= 0, got -2"),
    (["audit-poison", "--eval-seeds", "0"], "metagrad audit-poison: --eval-seeds must be >= 1, got 0"),
    (["audit-poison", "--num-steps", "0"], "metagrad audit-poison: --num-steps must be >= 1, got 0"),
    (["audit-poison", "--batch-size", "0"], "metagrad audit-poison: --batch-size must be >= 1, got 0"),
    (["audit-poison", "--lr", "-0.1"], "metagrad audit-poison: --lr must be > 0, got -0.1"),
    (["audit-poison", "--data", "cifar"], "metagrad audit-poison: --data must be 'mnist1d', 'fashion_mnist', a .npz file"),
    (["audit-poison", "--poison", "nowhere.npy"], "metagrad audit-poison: --poison: no such file 'nowhere.npy'"),
    (["audit-poison", "--choose", "best"], "metagrad audit-poison: --choose: invalid choice: 'best'"),
    (["interactive", "--port", "65536"], "metagrad interactive: --port must be a port in 0..65535"),
    (["interactive", "--num-steps", "0"], "metagrad interactive: --num-steps must be >= 1, got 0"),
    (["interactive", "--lr", "0"], "metagrad interactive: --lr must be > 0, got 0"),
    (["interactive", "--hidden", "0"], "metagrad interactive: --hidden must be >= 1, got 0"),
    (["interactive", "--eval-every", "-1"], "metagrad interactive: --eval-every must be >= 0, got -1"),
    (["interactive", "--step-delay", "-1"], "metagrad interactive: --step-delay must be >= 0, got -1"),
    (["interactive", "--agent-every", "0"], "metagrad interactive: --agent-every must be >= 1, got 0"),
    (["replay-log", __file__, "--k", "1"], "metagrad replay-log: --k must be >= 2, got 1"),
    (["replay-log", __file__, "--json", "no/such/folder/out.json"], "metagrad replay-log: --json: cannot write"),
    (["replay-log", os.path.dirname(__file__)], "metagrad replay-log: LOG:"),
    (["demo", "--bogus"], "metagrad: unrecognized arguments: --bogus"),
    ([], "metagrad: the following arguments are required: COMMAND"),
]


@pytest.mark.parametrize("argv,message", OPTION_ERRORS, ids=[" ".join(a) or "none" for a, _ in OPTION_ERRORS])
def test_out_of_range_options_are_refused_when_parsed(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parser, _ = cli.build_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(message), err


def test_the_defaults_and_ordinary_values_still_parse(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parser, _ = cli.build_parser()
    audit = parser.parse_args(["audit-poison"])
    assert (audit.data, audit.out, audit.fraction, audit.eps, audit.model, audit.meta_steps, audit.refine_steps) == (
        "mnist1d", "poison_audit", 0.025, 2.0, "mlp", 60, 40)
    demo = parser.parse_args(["demo", "--num-steps", "1", "--k", "2", "--seed", "0", "--out", str(tmp_path)])
    assert (demo.num_steps, demo.k, demo.seed, demo.out) == (1, 2, 0, str(tmp_path))
    assert parser.parse_args(["interactive", "--port", "0", "--eval-every", "0"]).port == 0
    assert parser.parse_args(["audit-poison", "--data", "tfds:mnist", "--seeds-per-step", "2"]).seeds_per_step == 2


def test_library_errors_name_flags_and_python_callers_still_get_exceptions(capsys):
    _, flags = cli.build_parser()

    def fails(args):
        raise ValueError("num_meta_steps must be an integer >= 0, got -1.\n"
                         "/x/mgd_checkpoints holds a run with other settings (eval_seeds: 1 -> 2): pass fresh=True "
                         "to discard it, or give another directory.")

    args = type("Args", (), {"command": "audit-poison", "func": staticmethod(fails)})()
    assert cli.run_command(args, flags["audit-poison"]) == 2
    assert capsys.readouterr().err == (
        "metagrad audit-poison: --meta-steps must be an integer >= 0, got -1. /x/mgd_checkpoints holds a run with "
        "other settings (--eval-seeds: 1 -> 2): pass --fresh to discard it, or give another --out.\n")
    with pytest.raises(ValueError, match="num_meta_steps"):  # main([...]) from Python raises, as before
        cli.run_command(args, flags["audit-poison"], catch_errors=False)

    def bug(args):
        raise KeyError("a real bug")

    args.func = staticmethod(bug)
    with pytest.raises(KeyError):  # not an ordinary mistake: its traceback is shown
        cli.run_command(args, flags["audit-poison"])


@pytest.mark.parametrize("n,marker", [(1, "o"), (5, "."), (1000, "None")])
def test_a_single_point_still_shows_in_a_line_plot(n, marker):
    from metagrad.report import plot_line, pyplot

    plt = pyplot()
    fig, ax = plt.subplots()
    try:
        (line,) = plot_line(ax, np.arange(n), np.ones(n))
        assert str(line.get_marker()) == marker
        (always,) = plot_line(ax, np.arange(n), np.ones(n), short=None)
        assert always.get_marker() in ("o", ".")
    finally:
        plt.close(fig)
