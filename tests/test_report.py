"""metagrad.report: the finished-parts record that lets a killed experiment resume."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest

from metagrad.report import FinishedParts, library_source_fingerprint, source_fingerprint


def test_finished_parts_survive_a_restart_and_refuse_other_settings(tmp_path):
    folder = tmp_path / "out" / "finished"
    settings = {"lr": 0.05, "seeds": (1, 2)}
    first = FinishedParts(str(folder) + ".json", settings)  # an older caller's path names the same folder
    assert first.path == str(folder) and first.get("seed_1") is None
    first.put("seed_1", {"accuracy": np.float32(0.25), "steps": None, "curve": np.arange(3)})
    assert first.get("seed_1") == {"accuracy": 0.25, "steps": None, "curve": [0, 1, 2]}
    assert sorted(p.name for p in folder.iterdir()) == ["parts.json", "settings.json"]  # no temporary file left

    again = FinishedParts(str(folder), {"lr": 0.05, "seeds": [1, 2]})  # a rerun (tuples and lists agree in JSON)
    assert again.get("seed_1") == first.get("seed_1") and again.get("seed_2") is None

    with pytest.raises(ValueError, match=r"other settings \(lr: 0.05 -> 0.1\): pass fresh=True"):
        FinishedParts(str(folder), {"lr": 0.1, "seeds": (1, 2)})
    fresh = FinishedParts(str(folder), {"lr": 0.1, "seeds": (1, 2)}, fresh=True)
    assert fresh.get("seed_1") is None

    (folder / "parts.json").write_text('{"seed_1": 0.')  # a torn file (not written by the store)
    with pytest.raises(ValueError, match="unreadable .* fresh=True"):
        FinishedParts(str(folder), {"lr": 0.1, "seeds": (1, 2)})

    done = FinishedParts(str(folder), settings, fresh=True)
    done.put("seed_1", 1.0)
    done.clear()
    assert not folder.exists()


def test_finished_parts_refuse_parts_computed_by_other_library_code(tmp_path):
    folder = tmp_path / "finished"
    FinishedParts(str(folder), {"lr": 0.05}).put("seed_1", 0.5)
    saved = json.loads((folder / "settings.json").read_text())
    assert saved["library_source"] == library_source_fingerprint()
    assert FinishedParts(str(folder), {"lr": 0.05}).get("seed_1") == 0.5  # the same code resumes
    saved["library_source"] = "0" * 16  # as if an earlier version of metagrad had computed the part
    (folder / "settings.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="other settings \\(library_source: '0000000000000000' -> "):
        FinishedParts(str(folder), {"lr": 0.05})
    assert FinishedParts(str(folder), {"lr": 0.05}, fresh=True).get("seed_1") is None


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
