"""Language modelling on a multi-domain byte corpus as a metagrad Problem.

:class:`LMProblem` implements :class:`metagrad.Problem` for next-byte
prediction: a flax model (e.g. :class:`~metagrad.lm.Transformer`) trained by
any optax optimizer on windows of a :class:`~metagrad.lm.Corpus`'s training
bytes, with the validation loss as the metaobjective, so that REPLAY
(Engstrom et al., "Optimizing ML Training with Metagradient Descent", arXiv
2503.13751) differentiates a whole training run exactly::

    state_0     = problem.init_state()
    state_{t+1} = problem.step(state_t, meta, t)
    value       = problem.objective(state_T, meta)   # val loss (nats per byte) on the target domain(s)

Batches. Each domain's training bytes are cut into *documents*, chunks of
``doc_size`` bytes (a tail shorter than one document is left out). The batch
of step ``t`` holds ``batch_size`` windows of ``seq_len + 1`` bytes; window
``j`` comes from domain ``j mod k`` (so every domain has ``floor`` or ``ceil``
of ``batch_size / k`` windows at every step), from a document of that domain
and an offset inside it drawn with the key ``stream_key(seed, "batch", t)``:
a pure function of ``(seed, t)``. A window never crosses a document boundary.

Metaparameters are the plugins of :mod:`metagrad.meta`, each entering the
step through its hook (the problem never branches on their names): the
learning-rate schedule (:class:`~metagrad.LRSchedule`, which multiplies the
optimizer's final update), per-document weights (:class:`~metagrad.DataWeights`:
one weight per document, multiplying the loss of the windows drawn from it)
and per-domain mixture weights (:class:`~metagrad.lm.MixtureWeights`, on the
simplex: each domain's share of the loss), and any new kind. The batch a hook
sees is ``x`` (the windows' first ``seq_len`` bytes), ``y`` (their last
``seq_len``), ``weights`` (one per window) and ``domain`` (of each window);
``ctx.indices`` are the windows' documents.

The metaobjective is the mean loss of a fixed set of validation windows
(``eval_windows`` per domain, evenly spaced through each domain's validation
bytes) of the target domain, or of every domain. The data reach the compiled
programs as arguments: ``problem.step`` and ``problem.objective`` are
``jax.tree_util.Partial`` objects holding the device arrays.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import replay

from ..meta import (DataWeights, LRSchedule, Metaparameter, ProblemInfo, StepContext, check_metaparameters,
                    init_metaparameters, injected_learning_rate, project_metaparameters, specs_by_name)
from ..models import Classifier
from ..problem import stream_key
from ..training import warn_structurally_zero
from .corpus import Corpus
from .mixture import MixtureWeights
from .transformer import bits_per_byte, token_losses, window_losses

__all__ = ["LMProblem", "LMProblemInfo", "evenly_spaced_windows"]

EVAL_SPLITS = ("val", "test")


@dataclasses.dataclass(frozen=True, eq=False)
class LMProblemInfo(ProblemInfo):
    """:class:`~metagrad.meta.ProblemInfo` of a language-modelling problem.

    ``num_train`` is the number of documents (so :class:`~metagrad.DataWeights` has one weight per document);
    ``input_shape`` is ``(seq_len,)``.

    Attributes:
      num_domains: ``k``.
      domain_names: the domains, in the corpus's order.
      doc_size: bytes per document.
      documents_per_domain: how many documents each domain has.
    """

    num_domains: int = 1
    domain_names: tuple[str, ...] = ()
    doc_size: int = 0
    documents_per_domain: tuple[int, ...] = ()


def evenly_spaced_windows(tokens, num_windows: int, length: int) -> np.ndarray:
    """``num_windows`` windows of ``length`` bytes at evenly spaced offsets from the start to the end of ``tokens``."""
    tokens = np.asarray(tokens)
    if tokens.shape[0] < length:
        raise ValueError(f"{tokens.shape[0]} bytes cannot hold a window of {length}.")
    starts = np.linspace(0, tokens.shape[0] - length, num_windows).round().astype(np.int64)
    return np.stack([tokens[s:s + length] for s in starts])


@dataclasses.dataclass(frozen=True, eq=False)
class LMProblem:
    """Next-byte prediction on the domains of a corpus, with metaparameters as plugins (see the module docstring).

    Args:
      model: a flax linen module mapping ``(n, seq_len)`` integer tokens to ``(n, seq_len, 256)`` logits,
        e.g. ``Transformer(config_named("small"))`` (``train=`` is passed when its ``__call__`` takes it;
        mutable collections are carried in ``state["model_state"]``).
      optimizer: any optax ``GradientTransformation`` (e.g. :func:`~metagrad.lm.baseline_optimizer`).
      corpus: a :class:`~metagrad.lm.Corpus` (or ``{domain: {"train", "val", "test": bytes}}``); every one of
        its domains is trained on (use ``corpus.select([...])`` for fewer).
      num_steps: training steps ``T``.
      batch_size: windows per step, spread over the domains (at least one per domain).
      seq_len: bytes the model reads per window (each window holds ``seq_len + 1``).
      seed: keys initialization, the windows of every step and dropout.
      doc_size: bytes per document (the unit of ``data_weights``); at least ``seq_len + 1``.
      lr_schedule, data_weights, mixture_weights: the built-in metaparameter specs (``None`` leaves one out;
        ``lr_schedule=None`` keeps the optimizer's own rate).
      metaparameters: further :class:`~metagrad.meta.Metaparameter` specs.
      target_domain: the domain whose validation loss is the metaobjective (``None``: all domains).
      eval_windows: validation (and test) windows per domain.
      param_dtype: dtype of parameters and weights (``jnp.float64`` with x64 for exactness checks).
    """

    model: nn.Module
    optimizer: optax.GradientTransformation
    corpus: Corpus
    num_steps: int
    batch_size: int = 16
    seq_len: int = 128
    seed: int = 0
    doc_size: int = 4096
    lr_schedule: LRSchedule | None = dataclasses.field(default_factory=LRSchedule)
    data_weights: DataWeights | None = None
    mixture_weights: MixtureWeights | None = None
    metaparameters: tuple = ()
    target_domain: str | None = None
    eval_windows: int = 32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if not isinstance(self.corpus, Corpus):
            object.__setattr__(self, "corpus", Corpus.from_arrays(self.corpus))
        for name in ("num_steps", "batch_size", "seq_len", "doc_size", "eval_windows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if not isinstance(self.optimizer, optax.GradientTransformation):
            raise TypeError("optimizer must be an optax GradientTransformation (e.g. "
                            f"metagrad.lm.baseline_optimizer()), got {type(self.optimizer).__name__}.")
        domains = self.corpus.domains
        if self.batch_size < len(domains):
            raise ValueError(f"batch_size={self.batch_size} gives some of the {len(domains)} domains no window: raise "
                             f"it to >= {len(domains)}, or train on fewer domains (corpus.select([...])).")
        if self.doc_size < self.seq_len + 1:
            raise ValueError(f"doc_size={self.doc_size} cannot hold a window of seq_len + 1 = {self.seq_len + 1} "
                             "bytes: raise doc_size or lower seq_len.")
        if self.target_domain is not None and self.target_domain not in domains:
            raise ValueError(f"target_domain={self.target_domain!r} is not a domain of the corpus {list(domains)}.")
        for name, splits in self.corpus.tokens.items():
            if np.size(splits["train"]) < self.doc_size:
                raise ValueError(f"domain {name!r} has {np.size(splits['train'])} training bytes, fewer than one "
                                 f"document of doc_size={self.doc_size}: lower doc_size.")
            for split in EVAL_SPLITS:
                if np.size(splits[split]) < self.seq_len + 1:
                    raise ValueError(f"domain {name!r} has {np.size(splits[split])} {split} bytes, fewer than one "
                                     f"window of seq_len + 1 = {self.seq_len + 1}: lower seq_len.")
        specs = self.meta_specs()
        object.__setattr__(self, "_classifier", Classifier(self.model))
        info = self.info()
        for spec in specs.values():
            spec.check(info)
        object.__setattr__(self, "_info", info)
        object.__setattr__(self, "_arrays", self.place_data(specs, info))
        object.__setattr__(self, "step", jax.tree_util.Partial(self.step_on, self._arrays["train"]))
        target = self._arrays["val"]
        if self.target_domain is not None:
            i = domains.index(self.target_domain)
            target = target[i:i + 1]
        object.__setattr__(self, "objective", jax.tree_util.Partial(self.objective_on, target))

    # ----------------------------------------------------------------- metaparameters
    def meta_specs(self) -> dict:
        """The declared metaparameter specs by name (the built-in three, then ``metaparameters``)."""
        out = specs_by_name((self.lr_schedule, self.data_weights, self.mixture_weights), self.metaparameters)
        for spec in out.values():
            if "x" in spec.batch_inputs:
                raise ValueError(f"{type(spec).__name__} changes the inputs x, but a language model's inputs are "
                                 "integer bytes: leave it out of LMProblem.")
        return out

    @property
    def domains(self) -> tuple[str, ...]:
        return self.corpus.domains

    @property
    def num_domains(self) -> int:
        return len(self.corpus.domains)

    def documents_per_domain(self) -> tuple[int, ...]:
        return tuple(int(np.size(self.corpus.tokens[d]["train"])) // self.doc_size for d in self.domains)

    def document_range(self, domain: str) -> tuple[int, int]:
        """``(start, stop)``: the documents of ``domain`` are ``start .. stop-1`` (rows of ``meta["data_weights"]``)."""
        if domain not in self.domains:
            raise ValueError(f"unknown domain {domain!r}; the problem's domains are {list(self.domains)}.")
        counts = self.documents_per_domain()
        i = self.domains.index(domain)
        start = sum(counts[:i])
        return start, start + counts[i]

    def info(self) -> LMProblemInfo:
        """What the metaparameters may know of this problem (:class:`LMProblemInfo`)."""
        cached = self.__dict__.get("_info")
        if cached is not None:
            return cached
        lr = injected_learning_rate(self.optimizer, self.param_dtype)
        counts = self.documents_per_domain()
        return LMProblemInfo(num_steps=self.num_steps, num_train=sum(counts), input_shape=(self.seq_len,),
                             dtype=jnp.dtype(self.param_dtype), input_range=(0, 255), learning_rate=lr,
                             num_domains=self.num_domains, domain_names=self.domains, doc_size=self.doc_size,
                             documents_per_domain=counts)

    def init_meta(self) -> dict:
        """Initial metaparameter values, one entry per declared spec."""
        return init_metaparameters(self.meta_specs(), self._info)

    def check_meta(self, meta) -> None:
        """Raise ``ValueError`` saying what to change when ``meta`` does not fit this problem."""
        check_metaparameters(meta, self.meta_specs(), self._info)

    def project_meta(self, meta) -> dict:
        """Map metaparameters back to their feasible sets."""
        return project_metaparameters(meta, self.meta_specs(), self._info)

    def learning_rates(self, meta):
        """The schedule's value at every step under ``meta`` (multipliers of the optimizer's rate, see LRSchedule)."""
        return self.lr_schedule.values(meta["lr_schedule"], self.num_steps)

    # ------------------------------------------------------------------ data on the device
    def place_data(self, specs: Mapping[str, Metaparameter], info: LMProblemInfo) -> dict:
        """The device arrays the compiled programs take as arguments.

        ``train``: ``documents`` (``uint8``, one row of ``doc_size`` bytes per document, the domains' in
        order), ``doc_base`` and ``num_docs`` (each domain's first document and count), ``slot_domain`` (the
        domain of each window of a batch) and ``meta`` (the metaparameters' data arrays); ``val`` and
        ``test``: ``(k, eval_windows, seq_len + 1)`` ``uint8`` windows.
        """
        counts = np.asarray(self.documents_per_domain(), np.int32)
        rows = [np.asarray(self.corpus.tokens[d]["train"][:n * self.doc_size], np.uint8).reshape(n, self.doc_size)
                for d, n in zip(self.domains, counts)]
        train = {
            "documents": jax.device_put(np.concatenate(rows)),
            "doc_base": jax.device_put(np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)),
            "num_docs": jax.device_put(counts),
            "slot_domain": jax.device_put((np.arange(self.batch_size) % self.num_domains).astype(np.int32)),
            "meta": {name: jax.tree.map(jax.device_put, spec.data_arrays(info)) for name, spec in specs.items()},
        }
        out = {"train": train}
        for split in EVAL_SPLITS:
            out[split] = jax.device_put(np.stack([
                evenly_spaced_windows(self.corpus.tokens[d][split], self.eval_windows, self.seq_len + 1)
                for d in self.domains]).astype(np.uint8))
        return out

    def device_data(self, split: str = "train"):
        """The device arrays of a split (see :meth:`place_data`)."""
        if split not in self._arrays:
            raise ValueError(f"unknown split {split!r}; use one of {sorted(self._arrays)}.")
        return self._arrays[split]

    # ------------------------------------------------------------------ the run
    def seed_of(self, meta):
        """The seed of the windows and dropout: ``meta["seed"]`` when present (:meth:`value_and_metagrad_at_seed`)."""
        return meta["seed"] if isinstance(meta, dict) and "seed" in meta else self.seed

    def init_state(self, meta=None) -> dict:
        """``state_0``: parameters (and mutable collections) initialized from ``stream_key(seed, "init")``, the
        optimizer state."""
        cached = self.__dict__.get("_state0")
        if cached is None:
            cached = self.initial_state_for_seed(self.seed)
            object.__setattr__(self, "_state0", cached)
        return cached

    def initial_state_for_seed(self, seed: int) -> dict:
        """``state_0`` of the run with initialization seed ``seed`` (not cached)."""
        example = jnp.zeros((1, self.seq_len), jnp.int32)
        params, model_state = self._classifier.init(stream_key(int(seed), "init"), example, self.param_dtype)
        state0 = {"params": params, "opt_state": self.optimizer.init(params)}
        if model_state:
            state0["model_state"] = model_state
        return state0

    def windows_on(self, arrays, t, seed=None):
        """``(windows, documents)`` of step ``t``: ``(batch_size, seq_len + 1)`` bytes and each window's document.

        Two random 32-bit words per window from ``stream_key(seed, "batch", t)`` (``seed``: the problem's
        unless given, e.g. traced): the first, modulo the
        number of documents of the window's domain, picks the document; the second, modulo
        ``doc_size - seq_len``, the window's first byte in it (the bias of the modulo is below
        ``n / 2**32``, under 1e-6 for a million documents).
        """
        seed = self.seed if seed is None else seed
        bits = jax.random.bits(stream_key(seed, "batch", t), (self.batch_size, 2), jnp.uint32)
        domain = arrays["slot_domain"]
        within = bits[:, 0] % arrays["num_docs"][domain].astype(jnp.uint32)
        docs = arrays["doc_base"][domain] + within.astype(jnp.int32)
        offsets = (bits[:, 1] % jnp.uint32(self.doc_size - self.seq_len)).astype(jnp.int32)
        windows = arrays["documents"][docs[:, None], offsets[:, None] + jnp.arange(self.seq_len + 1)]
        return windows, docs

    def batch_on(self, arrays, meta, t, params=None):
        """``(batch, ctx)`` of step ``t``: ``x``, ``y``, ``weights``, ``domain`` after every metaparameter's hook."""
        windows, docs = self.windows_on(arrays, t, self.seed_of(meta))
        windows = windows.astype(jnp.int32)
        batch = {"x": windows[:, :-1], "y": windows[:, 1:], "weights": jnp.ones((self.batch_size,), self.param_dtype),
                 "domain": arrays["slot_domain"]}
        ctx = StepContext(t=t, num_steps=self.num_steps, indices=docs, params=params, arrays=arrays["meta"])
        for name, spec in self.meta_specs().items():
            batch = spec.prepare_batch(meta[name], batch, ctx)
        return batch, ctx

    def training_batch(self, meta, t) -> dict:
        """The batch of step ``t`` with the metaparameters applied, and each window's ``document`` (compiled)."""
        return compiled_batch(self, self._arrays["train"], meta, jnp.asarray(t, jnp.int32))

    def logits(self, params, tokens, *, train: bool = False, rng=None, model_state=None):
        """The model's logits for ``(n, seq_len)`` tokens (evaluation mode unless ``train``)."""
        return self._classifier.logits(params, model_state or {}, tokens, train=train, rng=rng)[0]

    def batch_loss(self, params, model_state, batch, rng):
        """The weighted mean over the batch's windows of their mean next-byte loss, and the updated collections."""
        logits, model_state = self._classifier.logits(params, model_state, batch["x"], train=True, rng=rng)
        losses = jnp.mean(token_losses(logits, batch["y"]), axis=-1)
        return jnp.mean(batch["weights"] * losses), model_state

    def step_on(self, arrays, state, meta, t):
        """One optimizer step on the batch of step ``t`` drawn from ``arrays`` (``problem.step`` binds them)."""
        params = state["params"]
        batch, ctx = self.batch_on(arrays, meta, t, params)
        rng = stream_key(self.seed_of(meta), "dropout", t)
        grads, model_state = jax.grad(self.batch_loss, has_aux=True)(params, state.get("model_state", {}), batch, rng)
        update = self.optimizer.update
        for name, spec in self.meta_specs().items():
            update = spec.wrap_update(meta[name], update, ctx)
        updates, opt_state = update(grads, state["opt_state"], params)
        new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state}
        if "model_state" in state:
            new_state["model_state"] = model_state
        return new_state

    def domain_losses_on(self, state, windows):
        """The mean loss (nats per byte) of each domain's windows ``(k, n, seq_len + 1)``: shape ``(k,)``."""
        params = state["params"]
        model_state = state.get("model_state", {})
        k, n, length = windows.shape
        losses = window_losses(lambda x: self.logits(params, x, model_state=model_state),
                               windows.reshape(k * n, length))
        return jnp.mean(losses.reshape(k, n), axis=1)

    def objective_on(self, windows, state, meta):
        """The metaobjective: the mean validation loss of the target domain(s)' windows."""
        return jnp.mean(self.domain_losses_on(state, windows))

    # -------------------------------------------------------------- conveniences
    def train(self, meta, num_steps: int | None = None):
        """The final state after ``num_steps`` (default ``T``) steps: one compiled call."""
        return replay.advance(self.step, self.init_state(), meta, 0, num_steps or self.num_steps)

    def domain_losses(self, state, split: str = "val"):
        """``{domain: mean loss}`` of ``state`` on the evaluation windows of ``split`` (one compiled call)."""
        if split not in EVAL_SPLITS:
            raise ValueError(f"unknown evaluation split {split!r}; use one of {EVAL_SPLITS}.")
        losses = np.asarray(compiled_domain_losses(self, state, self._arrays[split]))
        return {d: float(v) for d, v in zip(self.domains, losses)}

    def evaluate(self, state) -> dict:
        """Loss (nats per byte) and bits per byte on the validation and test windows: overall and per domain."""
        out = {}
        for split in EVAL_SPLITS:
            per_domain = self.domain_losses(state, split)
            out[f"{split}_loss"] = float(np.mean(list(per_domain.values())))
            out[f"{split}_bpb"] = float(bits_per_byte(out[f"{split}_loss"]))
            for domain, loss in per_domain.items():
                out[f"{split}_loss/{domain}"] = loss
            if self.target_domain is not None:
                out[f"target_{split}_loss"] = per_domain[self.target_domain]
        return out

    def value_and_metagrad(self, meta, **kwargs):
        """``replay.value_and_metagrad`` of this problem's run (kwargs: ``k``, ``strategy``, ...)."""
        self.check_meta(meta)
        state0 = self.init_state()
        value, grad = replay.value_and_metagrad(self.step, self.objective, state0, meta, self.num_steps, **kwargs)
        if not kwargs.get("wrt_state0"):
            warn_structurally_zero(self, meta, state0, grad)
        return value, grad

    def value_and_metagrad_at_seed(self, meta, seed: int, **kwargs):
        """``value_and_metagrad`` of the run with training seed ``seed``, compiled once for every seed.

        Equal to ``dataclasses.replace(self, seed=seed).value_and_metagrad(meta)``, but the seed of the
        windows and dropout enters the step as a traced ``meta["seed"]`` (no gradient), so averaging
        metagradients over many training seeds (Engstrom et al., arXiv 2503.13751, Sec. 5.3: one fresh
        seed per meta-step) does not recompile REPLAY's programs for each.
        """
        self.check_meta(meta)
        state0 = self.initial_state_for_seed(seed)
        seeded = {**meta, "seed": jnp.asarray(seed, jnp.int32)}
        value, grad = replay.value_and_metagrad(self.step, self.objective, state0, seeded, self.num_steps, **kwargs)
        if not kwargs.get("wrt_state0"):
            warn_structurally_zero(self, seeded, state0, grad)
        return value, {name: g for name, g in grad.items() if name != "seed"}


@functools.partial(jax.jit, static_argnums=0)
def compiled_batch(problem: LMProblem, arrays, meta, t):
    """:meth:`LMProblem.batch_on`, with each window's ``document``, compiled once per problem."""
    batch, ctx = problem.batch_on(arrays, meta, t)
    return {**batch, "document": ctx.indices}


@functools.partial(jax.jit, static_argnums=0)
def compiled_domain_losses(problem: LMProblem, state, windows):
    """:meth:`LMProblem.domain_losses_on`, compiled once per problem."""
    return problem.domain_losses_on(state, windows)
