"""``metagrad corpus build``: build the multi-domain byte corpus from the text installed packages ship.

:func:`metagrad.cli.build_parser` registers it with :func:`add_corpus_parser`; its ordinary errors (an
existing corpus without ``--fresh``, a missing package folder) are printed by :func:`metagrad.cli.run_command`
as one line with the library's argument names written as flags (:data:`FLAG_NAMES`).
"""

from __future__ import annotations

import argparse
import os

from ..cli import output_folder, positive_float

#: library argument names -> flags, for the one-line error messages of :func:`metagrad.cli.run_command`
FLAG_NAMES = {"fresh=True": "--fresh", "out_dir": "--out", "max_bytes": "--max-mb", "max_file_bytes": "--max-file-mb"}


def add_corpus_parser(sub) -> argparse.ArgumentParser:
    """Add ``corpus`` (with its action ``build``) to the subparsers ``sub`` of a command line."""
    from .corpus import DEFAULT_DOMAINS

    p = sub.add_parser("corpus", help="the multi-domain byte-level text corpus, built offline from installed packages")
    actions = p.add_subparsers(dest="corpus_command", required=True, metavar="ACTION")
    build = actions.add_parser("build", help="build the corpus into a folder (deterministic for the same packages)")
    build.add_argument("--out", type=output_folder, default="metagrad_corpus",
                       help="the corpus folder (default: ./metagrad_corpus); an existing one is never overwritten "
                            "without --fresh")
    build.add_argument("--domains", nargs="+", choices=[d.name for d in DEFAULT_DOMAINS], metavar="DOMAIN",
                       help=f"build only these domains (default: all of {', '.join(d.name for d in DEFAULT_DOMAINS)})")
    build.add_argument("--max-mb", type=positive_float, default=8.0,
                       help="the most text per domain, in MiB (default 8)")
    build.add_argument("--max-file-mb", type=positive_float, default=0.25,
                       help="longer files are left out, in MiB (default 0.25)")
    build.add_argument("--fresh", action="store_true", help="replace an existing corpus in --out")
    build.add_argument("--no-progress", action="store_true")
    build.set_defaults(func=run_corpus_build)
    return p


def corpus_table(manifest: dict) -> str:
    """The domains of a corpus manifest: files, MiB per split, source packages and checksum."""
    lines = [f"{'domain':<12} {'files':>6} {'train MiB':>10} {'val MiB':>8} {'test MiB':>9} {'packages':>9}  sha256"]
    for name, entry in manifest["domains"].items():
        mib = {split: entry["bytes"][split] / 2 ** 20 for split in ("train", "val", "test")}
        packages = len(entry["packages"]["debian"]) + len(entry["packages"]["pypi"])
        lines.append(f"{name:<12} {sum(entry['files'].values()):>6} {mib['train']:>10.2f} {mib['val']:>8.2f} "
                     f"{mib['test']:>9.2f} {packages:>9}  {entry['sha256']['domain'][:16]}")
    lines.append(f"corpus sha256 {manifest['sha256']}")
    for name, why in manifest.get("missing", {}).items():
        lines.append(f"left out {name}: {why}")
    return "\n".join(lines)


def run_corpus_build(args) -> int:
    from .corpus import DEFAULT_DOMAINS, MANIFEST, build_corpus

    domains = [d for d in DEFAULT_DOMAINS if args.domains is None or d.name in args.domains]
    manifest = build_corpus(args.out, domains, max_bytes=int(args.max_mb * 2 ** 20),
                            max_file_bytes=int(args.max_file_mb * 2 ** 20), fresh=args.fresh,
                            progress=not args.no_progress)
    print(corpus_table(manifest))
    print(f"wrote {os.path.join(args.out, MANIFEST)}")
    return 0
