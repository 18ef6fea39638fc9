"""A multi-domain, byte-level text corpus built offline from the text that installed packages ship.

:func:`build_corpus` gathers, per *domain* (English prose, Python source, C
headers, licence texts, manual pages, changelogs, Perl), the text files that
Debian (or PyPI) packages install on this machine, and writes each domain as
three ``uint8`` arrays of bytes -- its train, validation and test splits --
beside a manifest (``manifest.json``) that records the packages and versions
each domain comes from and a SHA-256 of every split, of every domain and of the
whole. Bytes are the tokens (a vocabulary of 256, no tokenizer to download).

Determinism: files are visited in sorted order; identical contents are kept
once; a file's split is a function of the SHA-256 of its contents alone, so a
file never straddles two splits and the same files give the same corpus,
byte for byte. When a domain holds more text than ``max_bytes``, the files
kept are the first ones in an order given by their content hash (a fixed,
spread out sample of the packages, not the alphabetically first ones, and
independent of the split). Within a
split, files are concatenated in sorted path order, each followed by the byte
:data:`SEPARATOR` (0, which text files never hold) to mark where it ends.

:func:`load_corpus` reads a built corpus back (memory-mapped, checksums verified).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import gzip
import hashlib
import json
import os
import shutil
import subprocess
from typing import Iterable, Mapping, Sequence

import numpy as np

from ..progress import progress_bar

__all__ = [
    "BUILD_COMMAND", "Corpus", "DEFAULT_DOMAINS", "DomainSource", "MANIFEST", "SEPARATOR", "SPLITS",
    "build_corpus", "load_corpus", "package_owners", "read_text_file",
]

SPLITS = ("train", "val", "test")
#: the byte that ends every file in a split (text files hold no NUL byte, so it is free to mark a boundary)
SEPARATOR = 0
MANIFEST = "manifest.json"
FORMAT = 1
#: how to build a corpus from the command line (``{out}`` is the folder)
BUILD_COMMAND = "metagrad corpus build --out {out}"


@dataclasses.dataclass(frozen=True)
class DomainSource:
    """Where the text of one domain comes from.

    Args:
      name: the domain's name (a folder of the corpus; letters, digits, ``_`` and ``-``).
      description: one line on what the domain holds.
      roots: folders walked for files (glob patterns allowed, e.g. ``/usr/lib/python3.*``).
      patterns: ``fnmatch`` patterns over the *absolute* path; a file is taken when one matches
        (``*`` also matches ``/``). A name ending in ``.gz`` is decompressed.
      exclude: patterns of paths left out even when they match.
    """

    name: str
    description: str
    roots: tuple[str, ...]
    patterns: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.name or not all(c.isalnum() or c in "_-" for c in self.name):
            raise ValueError(f"DomainSource.name must be letters, digits, '_' or '-', got {self.name!r}.")
        for field in ("roots", "patterns", "exclude"):
            value = getattr(self, field)
            if isinstance(value, str):
                raise ValueError(f"DomainSource.{field} must be a tuple of strings, got the string {value!r}: "
                                 f"write ({value!r},).")
            object.__setattr__(self, field, tuple(value))
        if not self.roots:
            raise ValueError(f"domain {self.name!r} needs at least one root folder.")

    def matches(self, path: str) -> bool:
        return (any(fnmatch.fnmatchcase(path, p) for p in self.patterns)
                and not any(fnmatch.fnmatchcase(path, p) for p in self.exclude))

    def candidate_paths(self) -> list[str]:
        """Every regular file (no symbolic links) under the roots that the patterns take, in sorted order."""
        found = set()
        for pattern in self.roots:
            for root in sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]:
                if os.path.isfile(root) and not os.path.islink(root):
                    if self.matches(os.path.abspath(root)):
                        found.add(os.path.abspath(root))
                    continue
                for folder, dirs, files in os.walk(root):
                    dirs.sort()
                    for name in files:
                        path = os.path.abspath(os.path.join(folder, name))
                        if not os.path.islink(path) and self.matches(path):
                            found.add(path)
        return sorted(found)


#: The built-in domains, from what Debian packages install (Debian 12 paths; a missing root is skipped).
DEFAULT_DOMAINS = (
    DomainSource("prose", "English prose: package documentation (README, NEWS, .txt, .md, .rst)",
                 ("/usr/share/doc",),
                 ("*/README*", "*/NEWS*", "*.txt", "*.txt.gz", "*.md", "*.md.gz", "*.rst", "*.rst.gz"),
                 ("*/copyright", "*changelog*", "*.html*", "*.py", "*.c", "*.h")),
    DomainSource("python", "Python source: the Python standard library",
                 ("/usr/lib/python3.*",), ("*.py",), ("*/dist-packages/*", "*/site-packages/*")),
    DomainSource("c_headers", "C and C++ headers of the installed development packages",
                 ("/usr/include",), ("*.h",)),
    DomainSource("licenses", "licence texts: the common licences and every package's copyright file",
                 ("/usr/share/common-licenses", "/usr/share/doc"),
                 ("/usr/share/common-licenses/*", "/usr/share/doc/*/copyright")),
    DomainSource("man", "manual pages in English (roff source)",
                 ("/usr/share/man",), ("/usr/share/man/man[1-9]/*",)),
    DomainSource("changelogs", "release notes: Debian and upstream changelogs",
                 ("/usr/share/doc",), ("*/changelog", "*/changelog.gz", "*/changelog.Debian.gz")),
    DomainSource("perl", "Perl source: the Perl library's modules and scripts",
                 ("/usr/share/perl", "/usr/share/perl5", "/usr/lib/*/perl", "/usr/lib/*/perl5",
                  "/usr/lib/*/perl-base"), ("*.pm", "*.pl")),
)


# ------------------------------------------------------------------ reading files
def read_text_file(path: str) -> bytes | None:
    """The bytes of a text file (decompressed when the name ends in ``.gz``), or ``None`` if it is not text.

    Text here is UTF-8 without NUL bytes (NUL is :data:`SEPARATOR`); empty files are not text.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
        if path.endswith(".gz"):
            data = gzip.decompress(data)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if not data or b"\x00" in data:
        return None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return data


def split_of(digest: str, val_fraction: float, test_fraction: float) -> str:
    """The split of a file whose contents have SHA-256 ``digest`` (hex): a function of its first 16 digits alone."""
    u = int(digest[:16], 16) / 16 ** 16
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


# ------------------------------------------------------------------ which packages the files come from
def dpkg_owners(paths: Iterable[str], info_dir: str = "/var/lib/dpkg/info") -> dict:
    """``{path: Debian package}`` for the paths that dpkg's file lists name (``/usr``-merged paths included)."""
    wanted = set(paths)
    for path in list(wanted):
        real = os.path.realpath(path)
        if real != path:
            wanted.add(real)
    owners = {}
    for listing in sorted(glob.glob(os.path.join(info_dir, "*.list"))):
        package = os.path.basename(listing)[:-len(".list")]
        try:
            with open(listing, encoding="utf-8", errors="replace") as f:
                for line in f:
                    listed = line.rstrip("\n")
                    for candidate in (listed, "/usr" + listed if not listed.startswith("/usr/") else None):
                        if candidate in wanted and candidate not in owners:
                            owners[candidate] = package
        except OSError:
            continue
    out = {}
    for path in paths:
        owner = owners.get(path) or owners.get(os.path.realpath(path))
        if owner:
            out[path] = owner
    return out


def dpkg_versions() -> dict:
    """``{package: version}`` of every installed Debian package (``{}`` where ``dpkg-query`` is absent)."""
    try:
        listing = subprocess.run(["dpkg-query", "-W", "-f", "${binary:Package}\t${Package}\t${Version}\n"],
                                 capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    versions = {}
    for line in listing.splitlines():
        parts = line.split("\t")
        if len(parts) == 3:
            versions[parts[0]] = versions.setdefault(parts[1], parts[2])
    return versions


def pypi_owners(paths: Iterable[str]) -> dict:
    """``{path: (distribution, version)}`` for the paths that an installed distribution's RECORD names."""
    import importlib.metadata

    wanted = {os.path.realpath(p): p for p in paths}
    out = {}
    for dist in importlib.metadata.distributions():
        base = os.path.join(os.path.realpath(str(dist.locate_file(""))), "")
        if not any(real.startswith(base) for real in wanted):
            continue  # none of the paths lies where this distribution is installed
        name = dist.metadata["Name"]
        for file in dist.files or ():
            real = os.path.realpath(str(dist.locate_file(file)))
            if real in wanted and wanted[real] not in out:
                out[wanted[real]] = (name, dist.version)
    return out


def package_owners(paths: Sequence[str]) -> dict:
    """Which packages ``paths`` come from: ``{"debian": {package: version}, "pypi": {dist: version}, "unowned": n}``."""
    debian = dpkg_owners(paths)
    versions = dpkg_versions() if debian else {}
    rest = [p for p in paths if p not in debian]
    pypi = pypi_owners(rest) if rest else {}
    return {
        "debian": {pkg: versions.get(pkg, "unknown") for pkg in sorted(set(debian.values()))},
        "pypi": dict(sorted(set(pypi.values()))),
        "unowned": sum(1 for p in rest if p not in pypi),
    }


# ------------------------------------------------------------------ building
def select_files(source: DomainSource, *, max_bytes: int, max_file_bytes: int, progress: bool = True,
                 paths: Sequence[str] | None = None) -> dict:
    """The files of a domain, deduplicated by content and capped at ``max_bytes``: ``{digest: (path, size)}``.

    Files are read in sorted path order; of identical contents the first path is kept; when the domain holds
    more than ``max_bytes``, files are taken in the order of the last 32 hex digits of their content hash
    while they fit (the first 16 pick the split, :func:`split_of`, so the cap leaves the split fractions as
    they are).
    """
    by_digest = {}
    skipped = {"not_text": 0, "too_large": 0, "duplicate": 0}
    paths = source.candidate_paths() if paths is None else list(paths)
    for path in progress_bar(paths, desc=f"corpus {source.name}: scan", disable=not progress):
        data = read_text_file(path)
        if data is None:
            skipped["not_text"] += 1
            continue
        if len(data) > max_file_bytes:
            skipped["too_large"] += 1
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest in by_digest:
            skipped["duplicate"] += 1
            continue
        by_digest[digest] = (path, len(data))
    chosen, total = {}, 0
    # the order of the second half of the digest: independent of the first half, which picks the split
    for digest in sorted(by_digest, key=lambda d: (d[32:], d)):
        path, size = by_digest[digest]
        if total + size + 1 <= max_bytes:
            chosen[digest] = (path, size)
            total += size + 1
    skipped["over_max_bytes"] = len(by_digest) - len(chosen)
    return {"files": chosen, "skipped": skipped, "candidates": len(paths)}


def build_domain(source: DomainSource, folder: str, *, max_bytes: int, max_file_bytes: int, val_fraction: float,
                 test_fraction: float, progress: bool = True, paths: Sequence[str] | None = None) -> dict:
    """Write one domain's splits into ``folder`` (``train.npy``, ``val.npy``, ``test.npy``, ``files.tsv``).

    ``paths``: the domain's candidate files when already listed (default ``source.candidate_paths()``).
    Returns the domain's entry of the manifest.
    """
    selection = select_files(source, max_bytes=max_bytes, max_file_bytes=max_file_bytes, progress=progress,
                             paths=paths)
    files = selection["files"]
    by_split = {split: [] for split in SPLITS}
    for digest, (path, size) in files.items():
        by_split[split_of(digest, val_fraction, test_fraction)].append((path, digest, size))
    empty = [split for split in SPLITS if not by_split[split]]
    if empty:
        raise ValueError(
            f"domain {source.name!r} has {len(files)} usable files, too few to fill the {'/'.join(empty)} "
            f"split(s) (patterns {list(source.patterns)} under {list(source.roots)}): give it more files, or "
            "leave the domain out."
        )
    os.makedirs(folder)
    entry = {"description": source.description, "roots": list(source.roots), "patterns": list(source.patterns),
             "exclude": list(source.exclude), "candidates": selection["candidates"], "skipped": selection["skipped"],
             "files": {}, "bytes": {}, "sha256": {}}
    domain_hash = hashlib.sha256()
    rows = []
    for split in SPLITS:
        chunks = []
        members = sorted(by_split[split])
        for path, digest, _ in progress_bar(members, desc=f"corpus {source.name}: {split}", disable=not progress):
            data = read_text_file(path)
            if data is None or hashlib.sha256(data).hexdigest() != digest:
                raise ValueError(f"{path} changed while the corpus was being built: build it again.")
            chunks += [data, bytes([SEPARATOR])]
            rows.append(f"{split}\t{digest}\t{len(data)}\t{path}")
        tokens = np.frombuffer(b"".join(chunks), dtype=np.uint8)
        np.save(os.path.join(folder, f"{split}.npy"), tokens)
        entry["files"][split] = len(members)
        entry["bytes"][split] = int(tokens.size)
        entry["sha256"][split] = hashlib.sha256(tokens.tobytes()).hexdigest()
        domain_hash.update(tokens.tobytes())
    entry["sha256"]["domain"] = domain_hash.hexdigest()
    with open(os.path.join(folder, "files.tsv"), "w", encoding="utf-8") as f:
        f.write("split\tsha256\tbytes\tpath\n" + "\n".join(rows) + "\n")
    entry["packages"] = package_owners(sorted(path for path, _ in files.values()))
    return entry


def corpus_checksum(domains: Mapping[str, dict]) -> str:
    """The checksum of a whole corpus: SHA-256 of ``"name sha256\\n"`` over its domains, in order."""
    lines = "".join(f"{name} {entry['sha256']['domain']}\n" for name, entry in domains.items())
    return hashlib.sha256(lines.encode()).hexdigest()


def prepare_out_dir(out_dir: str, fresh: bool) -> None:
    """Refuse to overwrite an existing folder unless ``fresh`` (and then only a corpus or an empty folder)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"{out_dir!r} is a file, not a folder: give another out_dir.")
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return
    if not fresh:
        raise FileExistsError(f"{out_dir!r} already holds files: pass fresh=True to rebuild the corpus there, or "
                              "give another out_dir.")
    if not os.path.isfile(os.path.join(out_dir, MANIFEST)):
        raise FileExistsError(f"{out_dir!r} holds files but no corpus ({MANIFEST} is missing), so fresh=True "
                              "will not delete them: give another out_dir.")


def build_corpus(out_dir: str, domains: Sequence[DomainSource] = DEFAULT_DOMAINS, *,
                 max_bytes: int = 8 * 2 ** 20, max_file_bytes: int = 2 ** 18, val_fraction: float = 0.05,
                 test_fraction: float = 0.05, fresh: bool = False, progress: bool = True) -> dict:
    """Build the corpus of ``domains`` into ``out_dir`` and return its manifest (also written as ``manifest.json``).

    Args:
      out_dir: the corpus folder: one folder per domain holding ``train.npy``, ``val.npy``,
        ``test.npy`` (``uint8`` bytes) and ``files.tsv`` (which file went to which split).
      domains: :class:`DomainSource` values (default :data:`DEFAULT_DOMAINS`); a domain with no
        files on this machine is left out with a note in the manifest's ``missing``.
      max_bytes: the most bytes of text per domain.
      max_file_bytes: longer files are left out (one file should not be a large part of a domain).
      val_fraction, test_fraction: the expected fractions of files in the validation and test splits.
      fresh: replace an existing corpus in ``out_dir`` (an existing folder is never overwritten otherwise).
      progress: show progress bars.
    """
    if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be > 0 and "
                         "sum to less than 1.")
    if max_bytes < 1 or max_file_bytes < 1:
        raise ValueError(f"max_bytes={max_bytes} and max_file_bytes={max_file_bytes} must be >= 1.")
    names = [d.name for d in domains]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"give one or more domains with different names, got {names}.")
    prepare_out_dir(out_dir, fresh)
    out_dir = os.path.abspath(out_dir)
    partial = f"{out_dir}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        entries, missing = {}, {}
        for source in domains:
            paths = source.candidate_paths()
            if not paths:
                missing[source.name] = f"no files match {list(source.patterns)} under {list(source.roots)}"
                continue
            entries[source.name] = build_domain(
                source, os.path.join(partial, source.name), max_bytes=max_bytes, max_file_bytes=max_file_bytes,
                val_fraction=val_fraction, test_fraction=test_fraction, progress=progress, paths=paths)
        if not entries:
            raise ValueError(f"none of the domains {names} has files on this machine: {missing}.")
        manifest = {
            "format": FORMAT,
            "tokens": "bytes (vocabulary 256); byte 0 ends every file",
            "settings": {"max_bytes": max_bytes, "max_file_bytes": max_file_bytes, "val_fraction": val_fraction,
                         "test_fraction": test_fraction},
            "checksum_rule": "domain: sha256 of train, val, test bytes in order; corpus: sha256 of "
                             "'<name> <domain sha256>\\n' over domains in order",
            "sha256": corpus_checksum(entries),
            "domains": entries,
            "missing": missing,
        }
        with open(os.path.join(partial, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, sort_keys=False)
            f.write("\n")
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return manifest


# ------------------------------------------------------------------ loading
@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """The token arrays of a multi-domain corpus: ``tokens[domain][split]``, 1-D ``uint8`` arrays of bytes.

    Built by :func:`load_corpus`, or from arrays with :meth:`from_arrays` (e.g. in tests).
    """

    tokens: Mapping[str, Mapping[str, np.ndarray]]
    manifest: Mapping = dataclasses.field(default_factory=dict)
    path: str | None = None

    @classmethod
    def from_arrays(cls, tokens: Mapping[str, Mapping[str, Sequence[int]]], manifest: Mapping | None = None,
                    path: str | None = None) -> "Corpus":
        """A corpus from ``{domain: {"train": bytes, "val": bytes, "test": bytes}}`` (arrays of values 0..255)."""
        if not tokens:
            raise ValueError("a corpus needs at least one domain.")
        out = {}
        for name, splits in tokens.items():
            missing = [s for s in SPLITS if s not in splits]
            if missing:
                raise ValueError(f"domain {name!r} lacks the split(s) {missing}: give train, val and test.")
            arrays = {}
            for split in SPLITS:
                a = np.asarray(splits[split])
                if a.ndim != 1:
                    raise ValueError(f"domain {name!r} split {split!r} must be 1-D bytes, got shape {a.shape}.")
                if a.dtype != np.uint8:
                    if a.size and (np.min(a) < 0 or np.max(a) > 255):
                        raise ValueError(f"domain {name!r} split {split!r} holds values outside 0..255: "
                                         "tokens are bytes.")
                    a = a.astype(np.uint8)
                arrays[split] = a
            out[name] = arrays
        return cls(out, dict(manifest or {}), path)

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(self.tokens)

    def split(self, split: str) -> dict:
        """``{domain: tokens}`` of one split."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {SPLITS}.")
        return {name: splits[split] for name, splits in self.tokens.items()}

    def select(self, domains: Sequence[str]) -> "Corpus":
        """The corpus of ``domains`` only, in that order."""
        unknown = [d for d in domains if d not in self.tokens]
        if unknown:
            raise ValueError(f"unknown domain(s) {unknown}; the corpus has {list(self.tokens)}.")
        return Corpus({d: self.tokens[d] for d in domains}, self.manifest, self.path)

    def sizes(self) -> dict:
        """``{domain: {split: bytes}}``."""
        return {name: {split: int(np.size(a)) for split, a in splits.items()} for name, splits in self.tokens.items()}


def load_corpus(path: str, domains: Sequence[str] | None = None, *, verify: bool = True) -> Corpus:
    """The corpus built into ``path`` by :func:`build_corpus` (memory-mapped; checksums checked if ``verify``)."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise FileNotFoundError(f"no corpus at {path!r} ({MANIFEST} is missing): build it with "
                                f"`{BUILD_COMMAND.format(out=path)}` "
                                f"(or `python -m metagrad.lm.cli corpus build --out {path}`).")
    with open(manifest_path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"the corpus at {path!r} has format {manifest.get('format')!r}, this version reads "
                         f"{FORMAT}: rebuild it with `{BUILD_COMMAND.format(out=path)} --fresh`.")
    names = list(manifest["domains"]) if domains is None else list(domains)
    unknown = [d for d in names if d not in manifest["domains"]]
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}; the corpus at {path!r} has {list(manifest['domains'])}.")
    tokens = {}
    for name in names:
        tokens[name] = {}
        for split in SPLITS:
            file = os.path.join(path, name, f"{split}.npy")
            try:
                array = np.load(file, mmap_mode="r")
            except (OSError, ValueError) as err:
                raise ValueError(f"cannot read {file} ({err}): rebuild the corpus with "
                                 f"`{BUILD_COMMAND.format(out=path)} --fresh`.") from None
            if verify and hashlib.sha256(array.tobytes()).hexdigest() != manifest["domains"][name]["sha256"][split]:
                raise ValueError(f"{file} does not match its checksum in {MANIFEST}: rebuild the corpus with "
                                 f"`{BUILD_COMMAND.format(out=path)} --fresh`.")
            tokens[name][split] = array
    return Corpus(tokens, manifest, os.path.abspath(path))
