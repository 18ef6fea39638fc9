"""metagrad.report: the finished-parts record that lets a killed experiment resume."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest

from metagrad.report import FinishedParts, library_source_fingerprint, source_fingerprint


def test_finished_parts_survive_a_restart_and_refuse_other_settings(tmp_path):
    path = tmp_path / "out" / "finished.json"
    settings = {"lr": 0.05, "seeds": (1, 2)}
    first = FinishedParts(str(path), settings)
    assert first.get("seed_1") is None and not path.exists()
    first.put("seed_1", {"accuracy": np.float32(0.25), "steps": None, "curve": np.arange(3)})
    assert first.get("seed_1") == {"accuracy": 0.25, "steps": None, "curve": [0, 1, 2]}
    assert not (tmp_path / "out" / "finished.json.tmp").exists()  # written, then renamed into place

    again = FinishedParts(str(path), {"lr": 0.05, "seeds": [1, 2]})  # a rerun (tuples and lists agree in JSON)
    assert again.get("seed_1") == first.get("seed_1") and again.get("seed_2") is None

    with pytest.raises(ValueError, match=r"other settings \(lr\): pass --fresh"):
        FinishedParts(str(path), {"lr": 0.1, "seeds": (1, 2)})
    fresh = FinishedParts(str(path), {"lr": 0.1, "seeds": (1, 2)}, fresh=True)
    assert fresh.get("seed_1") is None and not path.exists()

    path.write_text('{"settings": {"lr": 0.1, "se')  # a torn file (not written by FinishedParts)
    with pytest.raises(ValueError, match="not a readable record .* --fresh"):
        FinishedParts(str(path), settings)
    path.write_text(json.dumps({"settings": settings}))
    with pytest.raises(ValueError, match="not a readable record"):
        FinishedParts(str(path), settings)

    done = FinishedParts(str(path), settings, fresh=True)
    done.put("seed_1", 1.0)
    done.clear()
    assert not path.exists()


def test_finished_parts_refuse_parts_computed_by_other_library_code(tmp_path):
    path = tmp_path / "finished.json"
    FinishedParts(str(path), {"lr": 0.05}).put("seed_1", 0.5)
    saved = json.loads(path.read_text())
    assert saved["settings"]["library_source"] == library_source_fingerprint()
    assert FinishedParts(str(path), {"lr": 0.05}).get("seed_1") == 0.5  # the same code resumes
    saved["settings"]["library_source"] = "0" * 16  # as if an earlier version of metagrad had computed the part
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="other metagrad/replay source code: pass --fresh"):
        FinishedParts(str(path), {"lr": 0.05})
    assert FinishedParts(str(path), {"lr": 0.05}, fresh=True).get("seed_1") is None


def test_source_fingerprint_follows_every_file_of_a_package(tmp_path, monkeypatch):
    package = tmp_path / "toypkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("X = 1\n")
    (package / "sub" / "mod.py").write_text("Y = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    toypkg = importlib.import_module("toypkg")
    first = source_fingerprint(toypkg)
    assert source_fingerprint(toypkg) == first and len(first) == 16
    (package / "sub" / "mod.py").write_text("Y = 3\n")  # a file below the package's folder
    assert source_fingerprint(toypkg) != first
    (package / "sub" / "mod.py").write_text("Y = 2\n")
    assert source_fingerprint(toypkg) == first
