"""The main job, ``metagrad demo``, in its reduced size, through the installed console script."""

import json
import shutil
import subprocess
import sys


def test_demo_lowers_validation_loss(tmp_path):
    out = tmp_path / "demo"
    exe = shutil.which("metagrad")
    cmd = [exe] if exe else [sys.executable, "-m", "metagrad.cli"]
    proc = subprocess.run(cmd + ["demo", "--quick", "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["final"]["val_loss"] < result["initial"]["val_loss"]
    assert len(result["history"]) == result["config"]["meta_steps"]
    assert (out / "demo.png").stat().st_size > 10_000
    assert "initial schedule" in proc.stdout and "final schedule" in proc.stdout
    before = (out / "result.json").read_bytes()

    # the same folder with other settings: refused in one line naming the setting, the earlier result kept
    other = subprocess.run(cmd + ["demo", "--quick", "--k", "3", "--out", str(out), "--no-progress"],
                           capture_output=True, text=True, timeout=600)
    assert other.returncode != 0, other.stdout + other.stderr
    assert "Traceback" not in other.stderr, other.stderr
    lines = [line for line in other.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "k" in lines[0] and "--fresh" in lines[0], other.stderr
    assert (out / "result.json").read_bytes() == before
