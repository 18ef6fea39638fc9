"""MGD on the transformer language model's learning-rate schedule, against a grid of standard schedules.

Engstrom et al., "Optimizing ML Training with Metagradient Descent", arXiv
2503.13751, Sec. 5.3: MGD over the knots of a piecewise-linear schedule,
minimizing the validation loss of the final model, compared with a grid search
over standard schedules at the same number of steps. Here the problem is an
:class:`~metagrad.lm.LMProblem` (next-byte prediction on the multi-domain
corpus) and the optimizer clip + AdamW (:func:`~metagrad.lm.optim.scheduled_adamw`)
whose learning rate the schedule sets at every step. The search is the image
application's, unchanged (:func:`metagrad.apps.lr_schedule.search_schedule`):
log-space knots, one fresh training seed per meta-step, answers chosen on
selection seeds, every method rescored on fresh evaluation seeds. Only the
schedules' scale is the optimizer's: the grid's peaks and MGD's flat start are
AdamW learning rates (:data:`LM_SEARCH`).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from ..apps import lr_schedule as app
from ..meta import LRSchedule
from ..store import RunStore
from .corpus import Corpus, load_corpus
from .optim import scheduled_adamw
from .problem import EVAL_SPLITS, LMProblem
from .transformer import Transformer, bits_per_byte, config_named, count_parameters

__all__ = ["LM_SEARCH", "SMOKE_LM_SEARCH", "TargetScoredLMProblem", "lm_schedule_problem", "run_lm_schedule",
           "synthetic_corpus"]

#: :class:`~metagrad.apps.lr_schedule.ScheduleSearch`'s defaults, with the grid's peaks and MGD's start in AdamW's
#: units: 6 peaks from 1e-3 to 5e-2 (30 schedules), a flat start at 3e-3 (:func:`~metagrad.lm.baseline_optimizer`'s
#: default peak)
LM_SEARCH = app.ScheduleSearch(initial_lr=3e-3, peaks=(1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2))

#: every stage at the smallest size (a pipeline check)
SMOKE_LM_SEARCH = dataclasses.replace(app.SMOKE_SEARCH, initial_lr=3e-3, peaks=(1e-2,))

#: the sizes of a smoke run (``config="tiny"``: context 16)
SMOKE_SIZES = {"config": "tiny", "num_steps": 8, "batch_size": 6, "seq_len": 8, "doc_size": 32, "eval_windows": 4}


@dataclasses.dataclass(frozen=True, eq=False)
class TargetScoredLMProblem(LMProblem):
    """An :class:`~metagrad.lm.LMProblem` whose ``evaluate`` reports the metaobjective's loss as ``val_loss``.

    With a ``target_domain``, ``val_loss`` / ``test_loss`` (and ``val_bpb`` / ``test_bpb``) are that domain's,
    so that a search which selects and scores on ``val_loss`` (:func:`~metagrad.apps.lr_schedule.search_schedule`)
    does so on the objective MGD minimizes; the means over every domain are kept as ``all_val_loss``,
    ``all_test_loss``, ``all_val_bpb``, ``all_test_bpb``. Without one it is an ``LMProblem``.
    """

    def evaluate(self, state) -> dict:
        out = super().evaluate(state)
        if self.target_domain is None:
            return out
        for split in EVAL_SPLITS:
            out[f"all_{split}_loss"], out[f"all_{split}_bpb"] = out[f"{split}_loss"], out[f"{split}_bpb"]
            out[f"{split}_loss"] = out[f"target_{split}_loss"]
            out[f"{split}_bpb"] = float(bits_per_byte(out[f"{split}_loss"]))
        return out


def synthetic_corpus(train_bytes: int = 512, seed: int = 0) -> Corpus:
    """Three small synthetic domains (random letters, random digits, a noisy repeating pattern) for a smoke run."""
    rng = np.random.default_rng(seed)

    def domain(draw):
        return {split: draw(n).astype(np.uint8) for split, n in (("train", train_bytes), ("val", 64), ("test", 64))}

    return Corpus.from_arrays({
        "letters": domain(lambda n: rng.integers(97, 123, n)),
        "digits": domain(lambda n: rng.integers(48, 58, n)),
        "pattern": domain(lambda n: np.arange(n) * 7 % 13 + 65 + rng.integers(0, 2, n)),
    })


def lm_schedule_problem(corpus: Corpus, *, config: str = "small", num_steps: int, batch_size: int, seq_len: int,
                        target_domain: str | None = None, **problem_kwargs) -> TargetScoredLMProblem:
    """The problem :func:`run_lm_schedule` searches: ``Transformer(config_named(config))`` on every domain of
    ``corpus``, trained by clip + AdamW whose learning rate the schedule sets (:func:`scheduled_adamw`)."""
    cfg = config_named(config)
    if seq_len > cfg.context:
        raise ValueError(f"seq_len={seq_len} exceeds the {config!r} transformer's context of {cfg.context}: "
                         "lower seq_len or pick a larger config.")
    return TargetScoredLMProblem(Transformer(cfg), scheduled_adamw(), corpus, num_steps=num_steps,
                                 batch_size=batch_size, seq_len=seq_len, target_domain=target_domain,
                                 lr_schedule=LRSchedule(), **problem_kwargs)


def run_lm_schedule(corpus_path: str | None, out_dir: str, *, config: str = "small", num_steps: int = 400,
                    batch_size: int = 16, seq_len: int = 64, target_domain: str | None = None,
                    search: app.ScheduleSearch = LM_SEARCH, smoke: bool = False, fresh: bool = False,
                    progress: bool = True) -> dict:
    """:func:`~metagrad.apps.lr_schedule.search_schedule` on the language model; ``result.json`` and
    ``lr_schedule.png`` in ``out_dir``.

    ``corpus_path``: a corpus built by ``metagrad corpus build`` (:func:`~metagrad.lm.load_corpus`); every
    domain is trained on, and the metaobjective is the validation loss of ``target_domain`` (``None``: the mean
    over every domain), the ``val_loss`` of the report (:class:`TargetScoredLMProblem`). ``out_dir`` is the
    run's store, as in :func:`~metagrad.apps.lr_schedule.run_on_data`: a rerun resumes, other settings are
    refused (``fresh=True`` starts over). ``smoke``: every stage at the smallest size (:data:`SMOKE_SIZES`,
    :data:`SMOKE_LM_SEARCH`), on ``corpus_path`` or, when it is ``None``, on :func:`synthetic_corpus`.
    """
    problem_kwargs = {}
    if smoke:
        search = SMOKE_LM_SEARCH
        sizes = dict(SMOKE_SIZES)
        config, num_steps, batch_size, seq_len = (sizes.pop(k) for k in ("config", "num_steps", "batch_size",
                                                                         "seq_len"))
        problem_kwargs = sizes
    elif corpus_path is None:
        raise ValueError("give corpus_path, a corpus built by `metagrad corpus build --out DIR` (only a smoke run "
                         "has a built-in one).")
    corpus = synthetic_corpus() if corpus_path is None else load_corpus(corpus_path)
    settings = {"corpus": None if corpus_path is None else os.path.abspath(corpus_path),
                "corpus_sha256": corpus.manifest.get("sha256"), "domains": list(corpus.domains), "config": config,
                "num_steps": num_steps, "batch_size": batch_size, "seq_len": seq_len,
                "target_domain": target_domain, "smoke": smoke, "search": dataclasses.asdict(search)}
    store = RunStore(out_dir, settings, fresh=fresh)
    problem = lm_schedule_problem(corpus, config=config, num_steps=num_steps, batch_size=batch_size,
                                  seq_len=seq_len, target_domain=target_domain, **problem_kwargs)
    report = app.search_schedule(problem, search, store=store, progress=progress)
    report.update({**settings, "parameters": count_parameters(config_named(config)),
                   "objective": f"validation loss (nats per byte) of {target_domain or 'every domain (mean)'}",
                   "optimizer": "clip (global norm 1) + AdamW (b2 0.95, weight decay 0.1 on matrices), learning "
                                "rate from the schedule"})
    report["goals"] = app.goals(report)
    app.write_report(report, out_dir)
    return report
