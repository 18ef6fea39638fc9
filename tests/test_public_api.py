"""Public faces only: no module reaches into another's private names; moved names still work, with a warning."""

import ast
import importlib.util
import pathlib
import warnings

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metagrad as mg
from conftest import tiny_dataset

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("metagrad", "replay", "experiments", "tests") for p in (ROOT / folder).rglob("*.py"))


def _is_module(dotted: str) -> bool:
    try:
        return importlib.util.find_spec(dotted) is not None
    except (ImportError, ValueError):
        return False


def _module_aliases(tree: ast.Module) -> dict:
    """Local names bound to modules by the file's imports: ``{alias: dotted module name}``."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                if _is_module(f"{node.module}.{a.name}"):
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    return aliases


def _dotted(node):
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return None if inner is None else f"{inner}.{node.attr}"
    return None


def private_uses(path: pathlib.Path) -> list:
    """``module._name`` attribute uses, and ``from module import _name`` imports, in one file."""
    tree = ast.parse(path.read_text())
    aliases, found = _module_aliases(tree), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")
                      and not a.name.startswith("__") and node.module.split(".")[0] in ("metagrad", "replay")]
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = _dotted(node.value)
            if base is None or base.split(".")[0] not in aliases:
                continue
            module = ".".join([aliases[base.split(".")[0]]] + base.split(".")[1:])
            if module.split(".")[0] in ("metagrad", "replay") and _is_module(module):
                found.append(f"{module}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    offenders = {str(p.relative_to(ROOT)): private_uses(p) for p in SOURCES}
    offenders = {p: uses for p, uses in offenders.items() if uses}
    assert offenders == {}


def test_the_private_use_check_can_fail(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import replay\nfrom metagrad import hyperflow as hf\nfrom metagrad.data import _mix\n"
                      "replay.compiled._advance\nhf.flow._private()\n")
    assert sorted(private_uses(sample)) == ["metagrad.data._mix", "metagrad.hyperflow.flow._private",
                                            "replay.compiled._advance"]


def test_no_script_edits_sys_path():
    offenders = [str(p.relative_to(ROOT)) for p in SOURCES
                 if p.parts[-2] != "tests" and "sys.path" in p.read_text() and "experiments" in p.parts]
    assert offenders == []


def imported_modules(path: pathlib.Path) -> set:
    """The top-level names of the modules a file imports (absolute imports only)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def module_global_assignments(path: pathlib.Path) -> list:
    """``alias.name = ...`` where ``alias`` is an imported module: configuration by reassigning a module global."""
    tree = ast.parse(path.read_text())
    aliases = _module_aliases(tree)
    found = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id in aliases:
                found.append(f"{aliases[target.value.id]}.{target.attr}")
    return found


# Private attributes of other libraries' objects that have no public equivalent: namedtuple's _replace (its public
# API, underscored to avoid field names), argparse's list of a parser's options, jax.jit's count of compiled programs.
THIRD_PARTY_PRIVATE = {"_replace", "_actions", "_cache_size"}


def private_attribute_uses(path: pathlib.Path) -> list:
    """``obj._name`` for any ``obj`` but ``self``/``cls``: a private attribute of another object."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and node.attr not in THIRD_PARTY_PRIVATE
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
            found.append(ast.unparse(node))
    return found


def test_no_object_private_attribute_is_used_from_outside():
    offenders = {str(p.relative_to(ROOT)): private_attribute_uses(p) for p in SOURCES
                 if p.name != "test_public_api.py"}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_replay_imports_nothing_from_metagrad_and_scripts_import_no_other_script():
    assert {str(p.relative_to(ROOT)) for p in (ROOT / "replay").rglob("*.py") if "metagrad" in imported_modules(p)} \
        == set()
    scripts = {p.stem for p in (ROOT / "experiments").rglob("*.py")}
    offenders = {str(p.relative_to(ROOT)): imported_modules(p) & scripts
                 for p in (ROOT / "experiments").rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_module_global_is_reassigned_from_outside():
    offenders = {str(p.relative_to(ROOT)): module_global_assignments(p) for p in SOURCES
                 if p.parts[-2] != "tests"}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_import_and_global_checks_can_fail(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import sys\nimport metagrad\nfrom metagrad.hyperflow import bias as hb\nimport replay_vs_peers\n"
                      "hb.conv_same = None\nsys.argv = []\nlocal = object()\nlocal.x = 1\n")
    assert imported_modules(sample) == {"sys", "metagrad", "replay_vs_peers"}
    assert module_global_assignments(sample) == ["metagrad.hyperflow.bias.conv_same", "sys.argv"]
    assert private_attribute_uses(sample) == []
    sample.write_text("trainer._seq = 3\nself._ok = 1\nt._replace(a=1)\n")
    assert private_attribute_uses(sample) == ["trainer._seq"]


def test_moved_names_still_work_with_a_deprecation_warning():
    import sys

    sys.modules.pop("metagrad.hyperflow_bias", None)
    with pytest.warns(DeprecationWarning, match="metagrad.hyperflow.bias"):
        import metagrad.hyperflow_bias as old
    from metagrad.hyperflow import bias

    assert old is bias
    problem = mg.TrainingProblem(mg.MLP(hidden=(4,), num_classes=3), optax.sgd(0.1), tiny_dataset(), num_steps=3,
                                 batch_size=4, lr_schedule=None)
    with pytest.warns(DeprecationWarning, match="pass a state"):
        old_form = problem.evaluate({})
    assert old_form == problem.evaluate(problem.train({}))
    for name in ("TrainingProblem", "from_arrays", "LRSchedule", "DataWeights", "Poison", "Dataset", "mnist1d"):
        assert hasattr(mg, name)
    import metagrad.apps  # noqa: F401
    import replay
    from metagrad.mgd import mgd  # noqa: F401

    for name in ("value_and_metagrad", "Replay", "FullUnroll", "Remat", "Binomial", "advance"):
        assert hasattr(replay, name)


def test_both_problems_implement_the_contract():
    data = tiny_dataset()
    supervised = mg.TrainingProblem(mg.MLP(hidden=(4,), num_classes=3), optax.adam(1e-2), data, num_steps=3,
                                    batch_size=4)
    mixing = mg.MixingProblem(mg.MLP(hidden=(4,), num_classes=3), optax.sgd(0.1), [data, data], data, num_steps=3,
                              batch_size=4, dga=mg.DGA(update_every=2, domain_batch_size=4))
    for problem in (supervised, mixing):
        mg.check_problem(problem)
        assert isinstance(problem, mg.Problem)
        meta = problem.init_meta()
        state = mg.train(problem, meta)
        report = problem.evaluate(state)
        assert {"val_loss", "test_accuracy"} <= set(report) and all(isinstance(v, float) for v in report.values())
        assert report == mg.train_and_evaluate(problem, meta)
        assert np.isfinite(float(problem.objective(state, meta)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mixing.train({}, 2)
    with pytest.warns(DeprecationWarning, match="train\\(meta, num_steps\\)"):
        mixing.train(2)
    assert np.all(np.asarray(supervised.init_meta()["lr_schedule"]) == 1.0)
    assert jnp.result_type(supervised.init_meta()["lr_schedule"]) == jnp.float32
