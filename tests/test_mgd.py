"""Metagradient descent: improves the objective, resumes after a kill, survives a torn checkpoint."""

import os

import numpy as np
import optax
import pytest

import replay
from conftest import tiny_problem
from metagrad.mgd import mgd


def _lr_only_problem():
    return tiny_problem("momentum_sgd", "float32", 40)


def _vg(problem):
    return lambda meta: problem.value_and_metagrad(meta, k=3)


def test_mgd_lowers_the_metaobjective():
    problem = _lr_only_problem()
    meta0 = problem.init_meta()
    result = mgd(_vg(problem), meta0, optimizer=optax.adam(0.02), num_meta_steps=6,
                 project=problem.project_meta, progress=False)
    values = [h["objective"] for h in result.history]
    assert len(values) == 6 and all(h["metagrad_norm"] > 0 for h in result.history)
    assert result.best_value < values[0]
    assert {"meta_step", "objective", "metagrad_norm", "seconds"} <= set(result.history[0])


class _Killed(Exception):
    pass


def test_a_killed_run_resumes_where_it_stopped(tmp_path):
    problem = _lr_only_problem()
    meta0 = problem.init_meta()
    kwargs = dict(optimizer=optax.adam(0.02), num_meta_steps=5, project=problem.project_meta, progress=False)
    uninterrupted = mgd(_vg(problem), meta0, **kwargs)

    def kill_after_two(i, meta, record):
        if i == 1:
            raise _Killed

    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(_Killed):
        mgd(_vg(problem), meta0, checkpoint_dir=ckpt, callback=kill_after_two, **kwargs)
    resumed = mgd(_vg(problem), meta0, checkpoint_dir=ckpt, **kwargs)
    assert resumed.resumed_from == 2
    assert [h["meta_step"] for h in resumed.history] == list(range(5))
    for name in meta0:
        np.testing.assert_allclose(resumed.meta[name], uninterrupted.meta[name], rtol=1e-6)
    # a finished run restarted does nothing more
    again = mgd(_vg(problem), meta0, checkpoint_dir=ckpt, **kwargs)
    assert again.resumed_from == 5 and len(again.history) == 5


def test_a_script_checkpoint_folder_refuses_to_resume_a_run_with_other_settings(tmp_path):
    import argparse

    from metagrad.mgd import checkpoint_folder, run_settings

    problem = _lr_only_problem()
    meta0 = problem.init_meta()
    kwargs = dict(optimizer=optax.adam(0.02), project=problem.project_meta, progress=False)
    args = argparse.Namespace(out=str(tmp_path), fresh=False, no_progress=True, meta_steps=2, lr=0.03)
    folder = checkpoint_folder(args.out, settings=run_settings(args))
    mgd(_vg(problem), meta0, num_meta_steps=2, checkpoint_dir=folder, **kwargs)
    # more meta-steps extend the saved run
    longer = argparse.Namespace(**{**vars(args), "meta_steps": 3})
    folder = checkpoint_folder(args.out, settings=run_settings(longer))
    assert mgd(_vg(problem), meta0, num_meta_steps=3, checkpoint_dir=folder, **kwargs).resumed_from == 2
    other = argparse.Namespace(**{**vars(args), "lr": 0.1})
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.03 -> 0.1\): pass fresh=True"):
        checkpoint_folder(args.out, settings=run_settings(other))
    folder = checkpoint_folder(args.out, fresh=True, settings=run_settings(other))
    assert mgd(_vg(problem), meta0, num_meta_steps=1, checkpoint_dir=folder, **kwargs).resumed_from == 0


def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before(tmp_path):
    problem = _lr_only_problem()
    meta0 = problem.init_meta()
    ckpt = tmp_path / "ckpt"
    kwargs = dict(optimizer=optax.adam(0.02), project=problem.project_meta, progress=False, checkpoint_dir=str(ckpt))
    mgd(_vg(problem), meta0, num_meta_steps=3, **kwargs)
    latest = ckpt / "trees" / "mgd" / "3"  # MGD's trees in the run store
    assert latest.is_dir()
    for root, _, files in os.walk(latest / "tree"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    resumed = mgd(_vg(problem), meta0, num_meta_steps=4, **kwargs)
    assert resumed.resumed_from == 2 and len(resumed.history) == 4


def test_nonfinite_metagradient_stops_with_the_meta_step_named(tmp_path):
    problem = _lr_only_problem()

    def poisoned_gradient(meta):
        value, grad = problem.value_and_metagrad(meta, k=3)
        if float(meta["lr_schedule"][0]) != float(problem.init_meta()["lr_schedule"][0]):
            grad = dict(grad, lr_schedule=grad["lr_schedule"] * np.nan)
        return value, grad

    with pytest.raises(replay.NonFiniteMetagradError, match=r"meta-step 1: .*saved in"):
        mgd(poisoned_gradient, problem.init_meta(), optimizer=optax.adam(0.02), num_meta_steps=4,
            project=problem.project_meta, progress=False, checkpoint_dir=str(tmp_path / "c"))
    # the finished meta-step is on disk
    assert (tmp_path / "c" / "trees" / "mgd" / "1").is_dir()
