"""The ``metagrad`` command line.

Every ordinary mistake ends in one line on stderr that says what to change and
exit status 2, never a traceback: options are checked when they are parsed (the
``type=`` functions below), and the ordinary errors a command meets while it
runs (:class:`UsageError`, ``ValueError`` -- :mod:`replay`'s errors among them --
and missing files) are printed by :func:`main` as ``metagrad <command>:
<message>``. Set ``METAGRAD_DEBUG=1`` to see their tracebacks instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import re
import sys


class UsageError(SystemExit):
    """An ordinary mistake found while a command runs (a missing extra, a busy port, a malformed input file).

    :func:`main` prints it as one line, ``metagrad <command>: <message>``, and exits with status 2. Like
    argparse's errors it is a ``SystemExit``, so a caller that does not catch it still gets the message and a
    non-zero exit rather than a traceback.
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


# ---------------------------------------------------------------------------------------------- option types
# Each checks one option when it is parsed. Their messages follow the flag's name ("--k must be >= 2, got 1");
# CommandLineParser.error prints them as "metagrad demo: --k must be >= 2, got 1".

def _number(text: str, kind: type):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def number_where(kind: type, holds, requirement: str, name: str, hint: str = ""):
    """An argparse ``type``: a number of ``kind`` for which ``holds(value)``; otherwise "must be
    ``requirement``, got ..." (then ``hint``, e.g. what the value means). ``name``: the type's name."""
    def parse(text: str):
        value = _number(text, kind)
        if not holds(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {value if kind is int else text}{hint}")
        return value

    parse.__name__ = name
    return parse


def int_at_least(low: int, hint: str = ""):
    """An argparse ``type``: an integer ``>= low`` (``hint`` follows the message, e.g. what the value means)."""
    return number_where(int, lambda v: v >= low, f">= {low}", f"int_at_least_{low}", hint)


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)
branching_factor = int_at_least(2, " (REPLAY splits each segment of the run into k parts; k=2 uses the least "
                                   "memory)")
port_number = number_where(int, lambda v: 0 <= v <= 65535, "a port in 0..65535 (0: any free port)", "port_number")
positive_float = number_where(float, lambda v: v > 0, "> 0", "positive_float")
nonnegative_float = number_where(float, lambda v: v >= 0, ">= 0", "nonnegative_float")
fraction_in_open_unit_interval = number_where(float, lambda v: 0 < v < 1, "> 0 and < 1",
                                              "fraction_in_open_unit_interval")
fraction_in_unit_interval = number_where(float, lambda v: 0 <= v <= 1, "in [0, 1]", "fraction_in_unit_interval")


def existing_file(text: str) -> str:
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"no such file {text!r}")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file")
    return text


def output_folder(text: str) -> str:
    """A folder to write into: a missing one is created, an existing file is refused."""
    if not text:
        raise argparse.ArgumentTypeError("must name a folder, got ''")
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is an existing file, not a folder; give a folder "
                                         "(a missing one is created)")
    return text


def output_file(text: str) -> str:
    """A file to write: its folder must exist and the path must not be a folder."""
    folder = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: there is no folder {folder!r}")
    return text


def dataset_spec(text: str) -> str:
    """``mnist1d``, ``fashion_mnist``, an existing ``.npz`` file or ``tfds:NAME``."""
    choices = "'mnist1d', 'fashion_mnist', a .npz file with arrays x and y (or x_train, y_train, x_test, y_test), or 'tfds:NAME'"
    if text in ("mnist1d", "fashion_mnist") or (text.startswith("tfds:") and len(text) > len("tfds:")):
        return text
    if text.endswith(".npz"):
        if not os.path.isfile(text):
            raise argparse.ArgumentTypeError(f"no such file {text!r} (give {choices})")
        return text
    raise argparse.ArgumentTypeError(f"must be {choices}, got {text!r}")


class CommandLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, ``PROG: what to change``, with exit status 2."""

    def error(self, message: str):
        match = re.match(r"argument (\S+): (.*)", message, re.S)
        if match:
            name, detail = match.group(1).split("/")[-1], match.group(2)  # "-o/--out" -> "--out"
            message = f"{name} {detail}" if detail.startswith("must ") else f"{name}: {detail}"
        else:
            message = f"{message} (see '{self.prog} --help')"
        self.exit(2, f"{self.prog}: {_one_line(message)}\n")


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _flag_names(parser: argparse.ArgumentParser, extra: dict | None = None) -> dict:
    """Library argument name -> flag, for error messages: each option whose flag is not its name (``num_steps``
    -> ``--num-steps``), plus ``extra`` (e.g. ``fresh=True`` -> ``--fresh``)."""
    names = {}
    for action in parser._actions:
        flags = [s for s in action.option_strings if s.startswith("--")]
        if flags and "_" in action.dest and flags[0] != "--" + action.dest:
            names[action.dest] = flags[0]
    names.update(extra or {})
    return names


def _in_flags(message: str, names: dict) -> str:
    for name in sorted(names, key=len, reverse=True):
        message = re.sub(rf"(?<![\w/.-]){re.escape(name)}(?![\w])", names[name], message)
    return message


def run_command(args, flag_names: dict | None = None, *, catch_errors: bool = True) -> int:
    """``args.func(args)``; with ``catch_errors``, an ordinary error is printed as one line and gives status 2."""
    if not catch_errors or os.environ.get("METAGRAD_DEBUG"):
        return args.func(args)
    prefix = f"metagrad {args.command}"
    try:
        return args.func(args)
    except UsageError as err:
        print(f"{prefix}: {_one_line(err)}", file=sys.stderr)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            PermissionError) as err:
        # ValueError includes replay.ReplayError and metagrad.store.StoreError
        message = _one_line(err) or type(err).__name__
        print(f"{prefix}: {_in_flags(message, flag_names or {})}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    return 2


def _demo(args) -> int:
    from .demo import DemoConfig, run_demo

    config = DemoConfig.quick() if args.quick else DemoConfig()
    overrides = {name: getattr(args, name) for name in ("num_steps", "meta_steps", "k", "seed")
                 if getattr(args, name) is not None}
    config = dataclasses.replace(config, **overrides)
    report = run_demo(args.out, config, progress=not args.no_progress, resume=not args.fresh)
    return 0 if report["final"]["val_loss"] <= report["initial"]["val_loss"] else 1


def _print_outcome(table: str, report: dict, args, png: str) -> int:
    """An application command's table, goals and files written (status 0)."""
    from .apps.common import goals_line

    print(table)
    print("goals: " + goals_line(report["goals"], args.smoke))
    print(f"wrote {os.path.join(args.out, 'result.json')} and {os.path.join(args.out, png)}")
    return 0


def _lr_schedule(args) -> int:
    from .apps import lr_schedule as app

    report = app.run_on_data(args.data, args.out, model=args.model, num_steps=args.num_steps,
                             batch_size=args.batch_size, search=app.ScheduleSearch(meta_steps=args.meta_steps),
                             smoke=args.smoke, fresh=args.fresh, progress=not args.no_progress)
    return _print_outcome(app.report_table(report), report, args, "lr_schedule.png")


def _select_data(args) -> int:
    from .apps import data_selection as app

    report = app.run_on_data(args.data, args.out, label_noise=args.label_noise, model=args.model,
                             num_steps=args.num_steps, batch_size=args.batch_size, learning_rate=args.lr,
                             search=app.SubsetSearch(keep_fraction=args.keep, meta_steps=args.meta_steps,
                                                     strategy=args.strategy),
                             smoke=args.smoke, fresh=args.fresh, progress=not args.no_progress)
    return _print_outcome(app.report_table(report), report, args, "data_selection.png")


def _audit_poison(args) -> int:
    from .apps import poisoning as app

    saved_delta, saved_indices = app.load_poison(args.poison) if args.poison else (None, None)
    attack = app.PoisonAttack(fraction=args.fraction, eps=args.eps, meta_steps=args.meta_steps,
                              refine_steps=args.refine_steps, seeds_per_step=args.seeds_per_step,
                              choose=args.choose, eval_seeds=tuple(range(100, 100 + args.eval_seeds)))
    report = app.run_on_data(args.data, args.out, model=args.model, num_steps=args.num_steps,
                             batch_size=args.batch_size, learning_rate=args.lr, attack=attack, smoke=args.smoke,
                             fresh=args.fresh, progress=not args.no_progress, poison_delta=saved_delta,
                             poison_indices=saved_indices)
    print(f"MGD drop {report['drop_points']['mgd']:.1f} points, {report['ratio_to_best_baseline']:.2f}x the best "
          f"baseline ({report['best_baseline']})")
    return _print_outcome(app.audit_table(report), report, args, "poisoning.png")


def build_parser() -> tuple[CommandLineParser, dict]:
    """The ``metagrad`` parser and, per command, its library-argument-name -> flag mapping (for error messages)."""
    parser = CommandLineParser(prog="metagrad", description="Differentiate, steer and reuse training runs.",
                               epilog="Errors are one line; set METAGRAD_DEBUG=1 to see their tracebacks.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = {"fresh=True": "--fresh", "give another directory": "give another --out"}
    demo = sub.add_parser("demo", help="metagradient descent on an LR schedule on MNIST-1D (built in, offline)")
    demo.add_argument("--out", type=output_folder, default="metagrad_demo",
                      help="output folder (default: ./metagrad_demo)")
    demo.add_argument("--quick", action="store_true", help="a reduced size (for CI)")
    demo.add_argument("--num-steps", type=positive_int, help="training steps per run")
    demo.add_argument("--meta-steps", type=positive_int, help="MGD steps")
    demo.add_argument("--k", type=branching_factor, help="REPLAY branching factor (>= 2)")
    demo.add_argument("--seed", type=nonnegative_int)
    demo.add_argument("--fresh", action="store_true", help="ignore checkpoints of an earlier run in --out")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(func=_demo)

    audit = sub.add_parser("audit-poison",
                           help="how far can poisoning a few training inputs lower test accuracy? (MGD)")
    audit.add_argument("--data", type=dataset_spec, default="mnist1d",
                       help="'mnist1d', 'fashion_mnist', a .npz (x, y or x_train, y_train, x_test, y_test) or "
                            "'tfds:NAME'")
    audit.add_argument("--model", choices=("mlp", "cnn"), default="mlp",
                       help="an MLP 64-64, or a CNN (residual BatchNorm CNN for images, 1-D CNN for sequences)")
    audit.add_argument("--out", type=output_folder, default="poison_audit",
                       help="output and resume folder (default: ./poison_audit)")
    audit.add_argument("--fraction", type=fraction_in_open_unit_interval, default=0.025,
                       help="fraction of training inputs perturbed, in (0, 1)")
    audit.add_argument("--eps", type=positive_float, default=2.0,
                       help="L-inf bound of each perturbation in units of each feature's scale (> 0)")
    audit.add_argument("--meta-steps", type=positive_int, default=60, help="signed MGD steps at eps/8")
    audit.add_argument("--refine-steps", type=nonnegative_int, default=40,
                       help="meta-steps after --meta-steps whose step anneals linearly from eps/16 to eps/160")
    audit.add_argument("--seeds-per-step", type=positive_int, default=4,
                       help="fresh training seeds (10000, 10001, ...) each meta-step averages over")
    audit.add_argument("--eval-seeds", type=positive_int, default=10,
                       help="fresh training seeds (100, 101, ...) every training set is retrained from")
    audit.add_argument("--choose", choices=("random", "influence"), default="influence",
                       help="which inputs to poison: a random subset, or those with the largest metagradient")
    audit.add_argument("--poison", type=existing_file,
                       help="re-score this saved poison_delta.npy instead of running the attack (on the "
                       "examples in poison_indices.npy beside it; without that file they are chosen again)")
    audit.add_argument("--num-steps", type=positive_int, default=500, help="training steps per run")
    audit.add_argument("--batch-size", type=positive_int, default=128)
    audit.add_argument("--lr", type=positive_float, default=0.03, help="momentum SGD's learning rate")
    audit.add_argument("--smoke", action="store_true", help="every stage at the smallest size (a pipeline check)")
    audit.add_argument("--fresh", action="store_true", help="discard an earlier run in --out")
    audit.add_argument("--no-progress", action="store_true")
    audit.set_defaults(func=_audit_poison)

    lr = sub.add_parser("lr-schedule", help="learn a learning-rate schedule by MGD against a grid of standard ones")
    lr.add_argument("--data", type=dataset_spec, default="mnist1d",
                    help="'mnist1d', 'fashion_mnist', a .npz (x, y or x_train, y_train, x_test, y_test) or 'tfds:NAME'")
    lr.add_argument("--model", choices=("mlp", "cnn"), default="mlp",
                    help="an MLP 64-64, or a CNN (residual BatchNorm CNN for images, 1-D CNN for sequences)")
    lr.add_argument("--out", type=output_folder, default="lr_schedule_run",
                    help="output and resume folder (default: ./lr_schedule_run)")
    lr.add_argument("--num-steps", type=positive_int, default=500, help="training steps per run")
    lr.add_argument("--batch-size", type=positive_int, default=128)
    lr.add_argument("--meta-steps", type=positive_int, default=50, help="MGD steps")
    lr.add_argument("--smoke", action="store_true", help="every stage at the smallest size (a pipeline check)")
    lr.add_argument("--fresh", action="store_true", help="discard an earlier run in --out")
    lr.add_argument("--no-progress", action="store_true")
    lr.set_defaults(func=_lr_schedule)

    select = sub.add_parser("select-data", help="select a training subset by MGD against the usual baselines")
    select.add_argument("--data", type=dataset_spec, default="mnist1d",
                        help="'mnist1d', 'fashion_mnist', a .npz (x, y or x_train, y_train, x_test, y_test) or "
                             "'tfds:NAME'")
    select.add_argument("--label-noise", type=fraction_in_unit_interval, default=0.3,
                        help="fraction of training labels flipped at random before selecting (in [0, 1))")
    select.add_argument("--keep", type=fraction_in_open_unit_interval, default=0.7,
                        help="fraction of the training set every selection keeps")
    select.add_argument("--model", choices=("mlp", "cnn"), default="mlp",
                        help="an MLP 64-64, or a CNN (residual BatchNorm CNN for images, 1-D CNN for sequences)")
    select.add_argument("--out", type=output_folder, default="select_data_run",
                        help="output and resume folder (default: ./select_data_run)")
    select.add_argument("--num-steps", type=positive_int, default=500, help="training steps per run")
    select.add_argument("--batch-size", type=positive_int, default=128)
    select.add_argument("--lr", type=positive_float, default=0.03, help="momentum SGD's learning rate")
    select.add_argument("--meta-steps", type=positive_int, default=40, help="MGD steps")
    select.add_argument("--strategy", choices=("eliminate", "weights"), default="eliminate",
                        help="from metagradients to a subset: remove the worst examples step by step (default), or "
                             "MGD on continuous weights keeping the largest")
    select.add_argument("--smoke", action="store_true", help="every stage at the smallest size (a pipeline check)")
    select.add_argument("--fresh", action="store_true", help="discard an earlier run in --out")
    select.add_argument("--no-progress", action="store_true")
    select.set_defaults(func=_select_data)

    from .interactive.cli import add_interactive_parser, add_replay_log_parser

    from .lm.cli import FLAG_NAMES as CORPUS_FLAG_NAMES
    from .lm.cli import add_corpus_parser

    interactive = add_interactive_parser(sub)  # metagrad interactive
    replay_log = add_replay_log_parser(sub)  # metagrad replay-log LOG
    add_corpus_parser(sub)  # metagrad corpus build
    flag_names = {"demo": _flag_names(demo, {**common, "num_meta_steps": "--meta-steps"}),
                  "audit-poison": _flag_names(audit, {**common, "num_meta_steps": "--meta-steps", "learning_rate": "--lr"}),
                  "lr-schedule": _flag_names(lr, {**common, "meta_steps": "--meta-steps"}),
                  "select-data": _flag_names(select, {**common, "meta_steps": "--meta-steps", "keep_fraction": "--keep",
                                                      "learning_rate": "--lr"}),
                  "interactive": _flag_names(interactive, common),
                  "replay-log": _flag_names(replay_log, common),
                  "corpus": {**common, **CORPUS_FLAG_NAMES}}
    return parser, flag_names


def main(argv=None, *, catch_errors: bool | None = None) -> int:
    """Run ``metagrad`` on ``argv`` (default: the command line) and return its exit status.

    With ``catch_errors`` (the default when ``argv`` is None, i.e. from the shell), an ordinary error raised
    while the command runs is printed as one line ``metagrad <command>: <message>`` and gives status 2;
    called with an ``argv`` list, e.g. from Python, the exception propagates unless ``catch_errors=True``.
    """
    parser, flag_names = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    for noisy in ("absl", "jax._src.xla_bridge", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return run_command(args, flag_names[args.command], catch_errors=argv is None if catch_errors is None
                       else catch_errors)


if __name__ == "__main__":
    # Run the module's imported copy, so that the UsageError raised by metagrad.interactive.cli (which imports
    # metagrad.cli) is the class main catches.
    from metagrad.cli import main as _main

    sys.exit(_main())
