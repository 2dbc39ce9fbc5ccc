"""A disk that fills up mid-stage, for real: the artifact root lives on a small tmpfs mounted for
the test (or, where mounting is not allowed, the run gets a file-size limit, RLIMIT_FSIZE).

The train stage runs out of space writing its resume point or checkpoint; the run must stop
with a message naming the root and the bytes involved, publish nothing half-written, and after
space is freed the same command must finish, reusing every stage published before. The dataset's
ids are paths (``../../escape/q0``): ids never become paths, so nothing appears outside the root."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from opsd.storage.catalog import Catalog
from opsd.storage.integrity import verify_root
from opsd.storage.layout import Layout
from tests.helpers import tiny_config

REPO = Path(__file__).resolve().parent.parent


class SmallDisk:
    """A size-limited place for the root: a tmpfs of ``mb`` MiB, or a file-size limit."""

    def __init__(self, where: Path, mb: int):
        self.mount = where / "fs"
        self.mount.mkdir()
        self.mb = mb
        self.mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mb}m", "tmpfs",
                                       str(self.mount)], capture_output=True).returncode == 0
        self.limited = True

    def grow(self) -> None:
        """Free space: a larger tmpfs (its files stay), or no more file-size limit."""
        if self.mounted:
            subprocess.run(["mount", "-o", "remount,size=512m", str(self.mount)], check=True)
        self.limited = False

    def preexec(self):
        if self.mounted or not self.limited:
            return None
        limit = 8 << 20  # the tiny model's weights are 12.9 MB: the checkpoint cannot be written

        def limit_files() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        return limit_files

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.mount)], capture_output=True)


def _run(recipe: Path, root: Path, disk: SmallDisk) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "opsd.cli", "run", str(recipe), "--root", str(root), "--no-progress"],
        env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=recipe.parent, capture_output=True,
        text=True, preexec_fn=disk.preexec(), timeout=1200)


@pytest.mark.timeout(1500)
def test_a_full_disk_fails_clearly_publishes_nothing_and_the_rerun_resumes(tiny_model_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    with data.open("w") as f:
        for i in range(8):
            f.write(json.dumps({"id": f"../../escape/q{i}" if i % 2 else f"a/b/{i}",
                                "prompt": f"Question {i}?", "split": "train" if i < 6 else "eval",
                                "verifier": {"type": "regex", "pattern": r"^\s*Sure"}}) + "\n")
    cfg = tiny_config(tiny_model_dir, data)
    cfg["train"].update(save_every=2)
    cfg["tracking"] = {"log_model": False}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(cfg))
    # ~5 MB reach the root before training (catalog, MLflow, small artifacts); a resume point
    # is 38.7 MB and the checkpoint 16.4 MB: the train stage is where the disk fills
    disk = SmallDisk(tmp_path, mb=40)
    root = disk.mount / "home"
    try:
        first = _run(recipe, root, disk)
        out = first.stdout + first.stderr
        assert first.returncode == 2, out[-4000:]
        assert "ran out of space under the artifact root" in out and str(root) in out, out[-4000:]
        assert "bytes" in out
        cat = Catalog(Layout.at(root))
        run = cat.runs()[-1]
        stages = {s["label"]: s for s in cat.stages(run["run_id"])}
        assert stages["train"]["status"] == "failed", stages["train"]
        assert not list((root / "artifacts" / "train").glob("*")), "nothing of train published"
        report = verify_root(Layout.at(root))
        assert report.ok, report.lines()

        disk.grow()
        second = _run(recipe, root, disk)
        assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
        cat = Catalog(Layout.at(root))
        final = {s["label"]: s for s in cat.stages(cat.runs()[-1]["run_id"])}
        done_before = [label for label, s in stages.items() if s["status"] == "completed"]
        assert done_before and all(final[label]["cached"] for label in done_before), final
        assert final["train"]["status"] == "completed" and not final["train"]["cached"]
        report = verify_root(Layout.at(root))
        assert report.ok and not report.unfinished, report.lines()
    finally:
        disk.close()
    # row ids that look like paths made no folders anywhere
    assert not [p for p in tmp_path.rglob("escape*")], list(tmp_path.rglob("escape*"))
    assert not (tmp_path.parent / "escape").exists()
