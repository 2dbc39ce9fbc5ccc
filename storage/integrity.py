"""Is a published artifact still what was published? Checks against the catalog's hashes.

An artifact is immutable after publication, and the catalog stores its size and SHA-256 per
file (:class:`opsd.storage.layout.ArtifactDigest`). A disk error, a truncated copy, an edit by
hand or a deleted file breaks that promise without anyone noticing — until a stage trains on a
flipped bit. :func:`check_artifact` compares an artifact folder with its catalog record and names
every damaged file; the pipeline calls it before it reuses an artifact, ``opsd verify`` for
every artifact of a root. Sizes are compared first (a ``stat``: a missing or truncated file is
found without reading anything), then contents are hashed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from opsd.storage.catalog import Catalog
from opsd.storage.layout import Layout, dir_stats, file_sha256, listing_digest


@dataclass(frozen=True)
class Damage:
    """One way an artifact differs from what was published."""

    key: str
    path: Path  # the damaged file, or the artifact folder
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def check_artifact(record: dict) -> list[Damage]:
    """Damage of one catalogued artifact (``Catalog.artifact``'s record); empty when intact.

    Artifacts catalogued with a per-file listing are checked file by file; older ones (only a
    folder hash) as a whole."""
    key, folder = record["key"], Path(record["path"])
    if not folder.is_dir():
        return [Damage(key, folder, "the artifact folder is missing")]
    files = record.get("files")
    if files is None:
        if record.get("hash") and dir_stats(folder)[1] != record["hash"]:
            return [Damage(key, folder, "contents differ from the hash recorded at publication")]
        return []
    damage = []
    present = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
    for rel, (size, _) in sorted(files.items()):
        if rel not in present:
            damage.append(Damage(key, folder / rel, "missing (deleted after publication)"))
        elif (actual := present[rel].stat().st_size) != size:
            damage.append(Damage(key, folder / rel, f"{actual} bytes, {size} when published "
                                 f"({'truncated' if actual < size else 'grown'})"))
    for rel in sorted(set(present) - set(files)):
        damage.append(Damage(key, folder / rel, "not part of the published artifact (added later)"))
    if damage:
        return damage  # no need to read anything
    for rel, (size, sha) in sorted(files.items()):
        if file_sha256(present[rel]) != sha:
            damage.append(Damage(key, folder / rel, "content differs from the SHA-256 recorded "
                                 "at publication (modified or bit rot)"))
    if not damage and record.get("hash") and listing_digest(files) != record["hash"]:
        damage.append(Damage(key, folder, "the catalog's file listing does not match its hash"))
    return damage


@dataclass
class Report:
    """What ``opsd verify`` found under one root."""

    checked: int = 0
    nbytes: int = 0
    seconds: float = 0.0
    damaged: list[Damage] = field(default_factory=list)
    # folders under artifacts/ that no catalog row knows: nothing would ever reuse or delete them
    orphans: list[Path] = field(default_factory=list)
    # folders whose catalog row is not complete (a publish cut short, a damaged artifact being
    # replaced): never reused, the next run that needs the key recomputes and replaces them
    unfinished: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.orphans

    def lines(self) -> list[str]:
        out = [f"damaged: {d}" for d in self.damaged]
        out += [f"orphan: {p}: a folder under artifacts/ the catalog does not know" for p in self.orphans]
        out += [f"unfinished: {p}: catalog status '{s}' (never reused; the next run that needs "
                "it recomputes it)" for p, s in self.unfinished]
        return out


def verify_root(layout: Layout, run_id: str | None = None) -> Report:
    """Check every complete artifact of the root (or of the stages of ``run_id``) against the
    catalog, and (whole root only) look for folders the catalog does not know."""
    t0 = time.perf_counter()
    report = Report()
    known = set()
    for record in Catalog(layout).artifact_records(run_id):
        folder = Path(record["path"])
        known.add(folder)
        if record["status"] != "complete":
            if folder.exists():
                report.unfinished.append((folder, record["status"]))
            continue
        report.checked += 1
        report.nbytes += record["bytes"] or 0
        report.damaged += check_artifact(record)
    if run_id is None:
        report.orphans = sorted(d for d in layout.artifacts.glob("*/*") if d not in known)
    report.seconds = time.perf_counter() - t0
    return report
