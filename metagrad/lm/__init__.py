"""Language models: a byte-level multi-domain text corpus, a decoder-only transformer and an LM Problem.

* :mod:`.corpus` -- :func:`build_corpus` builds, offline and deterministically, a corpus of several
  domains (prose, Python, C headers, licences, manual pages, changelogs, Perl) from the text installed
  packages ship; :func:`load_corpus` reads it back as a :class:`Corpus`.
* :mod:`.transformer` -- :class:`Transformer`, a GPT-2-style decoder-only transformer in flax
  (Radford et al. 2019), sized by :class:`TransformerConfig` (named sizes in :data:`CONFIGS`).
* :mod:`.optim` -- :func:`baseline_optimizer`: clipping, AdamW, linear warmup and cosine decay.
* :mod:`.mixture` -- :class:`MixtureWeights`, per-domain loss weights on the simplex as a metaparameter.
* :mod:`.problem` -- :class:`LMProblem`, next-byte prediction as a :class:`metagrad.Problem` whose
  metagradient REPLAY computes exactly (learning-rate schedule, per-document weights, mixture weights).
* :mod:`.schedule` -- :func:`run_lm_schedule`: MGD on the model's learning-rate schedule against a grid of
  standard schedules (Engstrom et al., arXiv 2503.13751, Sec. 5.3).
* :mod:`.cli` -- ``metagrad corpus build --out DIR`` (``python -m metagrad.lm.cli corpus build --out DIR``).
"""

from . import corpus, mixture, optim, problem, schedule, transformer
from .corpus import DEFAULT_DOMAINS, Corpus, DomainSource, build_corpus, load_corpus
from .mixture import MixtureWeights
from .optim import adamw_chain, baseline_optimizer, scheduled_adamw, warmup_cosine
from .problem import LMProblem, LMProblemInfo
from .schedule import run_lm_schedule
from .transformer import (CONFIGS, PARAMETER_RANGES, Transformer, TransformerConfig, bits_per_byte, config_named,
                          count_parameters, token_losses, window_losses)

__all__ = [
    "CONFIGS", "Corpus", "DEFAULT_DOMAINS", "DomainSource", "LMProblem", "LMProblemInfo", "MixtureWeights",
    "PARAMETER_RANGES", "Transformer", "TransformerConfig", "adamw_chain", "baseline_optimizer", "bits_per_byte",
    "build_corpus", "config_named", "corpus", "count_parameters", "load_corpus", "mixture", "optim", "problem",
    "run_lm_schedule", "schedule", "scheduled_adamw", "token_losses", "transformer", "warmup_cosine",
    "window_losses",
]
