"""A published artifact damaged after publication — a flipped bit in a Parquet shard, a
truncated safetensors file, a deleted file or folder, a file added by hand — is found before it
is reused, reported with its path, and recomputed (or, for an upstream a run must reuse,
refused with the command that recomputes it); ``opsd verify`` finds the same on a whole root.

Real components: the Pipeline's reuse path, a DuckDB catalog, MLflow on SQLite, Parquet and
safetensors files; the stage functions are small so each case takes a second."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from opsd.cli import app
from opsd.config import PipelineConfig
from opsd.flows.runner import ArtifactDamaged, Pipeline
from opsd.storage.catalog import Catalog
from opsd.storage.integrity import check_artifact, verify_root
from opsd.storage.layout import Layout


class Counter:
    """Stage functions that write a Parquet shard and a safetensors file, counting calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, ctx):
        self.calls += 1
        pq.write_table(pa.table({"x": list(range(1000))}), ctx.out_dir / "part-00000.parquet")
        (ctx.out_dir / "model").mkdir()
        save_file({"w": torch.arange(4096, dtype=torch.float32)}, str(ctx.out_dir / "model" / "model.safetensors"))
        return {"rows": 1000}


def _pipeline(root, run_id=None) -> Pipeline:
    p = Pipeline(PipelineConfig(), root, run_id, show_progress=False)
    p.start()
    return p


def _first_run(root):
    fn = Counter()
    p = _pipeline(root)
    art = p.stage("rollout", "rollout", {"n": 1}, {}, fn)
    p.finish("completed")
    return p, art, fn


def _flip_bit(path, offset=None):
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _delete(path):
    path.unlink()


def _add(path):
    (path.parent / "notes.txt").write_text("added by hand")


DAMAGE = {
    "bit flip in a Parquet shard": ("part-00000.parquet", _flip_bit, "content differs"),
    "truncated safetensors": ("model/model.safetensors", _truncate, "truncated"),
    "missing file": ("part-00000.parquet", _delete, "missing"),
    "file added after publication": ("part-00000.parquet", _add, "added later"),
}


@pytest.mark.parametrize("case", DAMAGE, ids=list(DAMAGE))
def test_damage_is_detected_before_reuse_and_recomputed(case, tmp_path):
    rel, damage, phrase = DAMAGE[case]
    _, art, _ = _first_run(tmp_path)
    original = pq.read_table(art.path / "part-00000.parquet")
    damage(art.path / rel)
    said: list[str] = []
    fn = Counter()
    p = Pipeline(PipelineConfig(), tmp_path, show_progress=False, logger=said.append)
    p.start()
    again = p.stage("rollout", "rollout", {"n": 1}, {}, fn)
    p.finish("completed")
    assert fn.calls == 1, "a damaged artifact must be recomputed, not reused"
    report = [m for m in said if "is damaged" in m]
    assert report and phrase in report[0] and str(art.path) in report[0], said
    # the recomputed artifact is whole again and equal to the first
    assert pq.read_table(again.path / "part-00000.parquet").equals(original)
    assert load_file(str(again.path / "model" / "model.safetensors"))["w"].shape == (4096,)
    assert verify_root(Layout.at(tmp_path)).ok
    assert not (again.path / "notes.txt").exists()


def test_a_deleted_artifact_folder_is_reported_and_recomputed(tmp_path):
    _, art, _ = _first_run(tmp_path)
    import shutil

    shutil.rmtree(art.path)
    said: list[str] = []
    fn = Counter()
    p = Pipeline(PipelineConfig(), tmp_path, show_progress=False, logger=said.append)
    p.start()
    p.stage("rollout", "rollout", {"n": 1}, {}, fn)
    assert fn.calls == 1 and any("folder is missing" in m for m in said), said


def test_an_intact_artifact_is_reused_and_the_check_is_timed(tmp_path):
    _first_run(tmp_path)
    said: list[str] = []
    fn = Counter()
    p = Pipeline(PipelineConfig(), tmp_path, show_progress=False, logger=said.append)
    p.start()
    p.stage("rollout", "rollout", {"n": 1}, {}, fn)
    assert fn.calls == 0
    assert any("checked against their hashes in" in m for m in said), said


def test_an_upstream_that_must_be_reused_is_refused_with_the_command_to_recompute(tmp_path):
    first, art, _ = _first_run(tmp_path)
    _flip_bit(art.path / "model" / "model.safetensors")
    p = _pipeline(tmp_path)
    with pytest.raises(ArtifactDamaged) as err:
        p.stage("rollout", "rollout", {"n": 1}, {}, Counter(), require_cached=True)
    msg = str(err.value)
    assert "model.safetensors" in msg and f"opsd stage rollout --run {first.run_id}" in msg
    # never offered again until recomputed
    assert Catalog(Layout.at(tmp_path)).artifact(art.key) is None


def test_opsd_verify_lists_damage_and_orphans_and_exits_non_zero(tmp_path):
    first, art, _ = _first_run(tmp_path)
    ok = CliRunner().invoke(app, ["verify", "--root", str(tmp_path)])
    assert ok.exit_code == 0 and "all intact" in ok.output, ok.output
    _flip_bit(art.path / "part-00000.parquet")
    (tmp_path / "artifacts" / "rollout" / "deadbeef").mkdir()
    bad = CliRunner().invoke(app, ["verify", "--root", str(tmp_path), "--json"])
    assert bad.exit_code == 1, bad.output
    out = json.loads(bad.output)
    assert [d["path"] for d in out["damaged"]] == [str(art.path / "part-00000.parquet")]
    assert out["orphans"] == [str(tmp_path.resolve() / "artifacts" / "rollout" / "deadbeef")]
    one = CliRunner().invoke(app, ["verify", "--root", str(tmp_path), "--run", first.run_id])
    assert one.exit_code == 1 and "part-00000.parquet" in one.output
    missing = CliRunner().invoke(app, ["verify", "--root", str(tmp_path), "--run", "nope"])
    assert missing.exit_code == 2 and "no run 'nope'" in missing.output


def test_check_artifact_of_an_older_catalog_row_uses_the_folder_hash(tmp_path):
    """Artifacts catalogued before per-file hashes existed are checked by their folder hash."""
    from opsd.storage.layout import dir_stats

    _, art, _ = _first_run(tmp_path)
    record = {"key": art.key, "path": str(art.path), "hash": dir_stats(art.path)[1], "files": None}
    assert check_artifact(record) == []
    _flip_bit(art.path / "part-00000.parquet")
    assert "differ" in check_artifact(record)[0].problem


def test_leftovers_of_an_interrupted_write_are_not_published(tmp_path):
    """A killed attempt leaves "<name>.tmp-<pid>" temporaries (a shard, a resume point) in the
    staging folder; the artifact published by the rerun does not contain them."""

    def stage_fn(ctx):
        (ctx.out_dir / ".part-00001.parquet.tmp-4242").write_bytes(b"half a shard")
        (ctx.out_dir / "resume.tmp-4242").mkdir()
        (ctx.out_dir / "resume.tmp-4242" / "model.safetensors").write_bytes(b"half")
        return Counter()(ctx)

    p = _pipeline(tmp_path)
    art = p.stage("rollout", "rollout", {"n": 1}, {}, stage_fn)
    names = sorted(x.name for x in art.path.rglob("*"))
    assert not [n for n in names if "tmp-" in n], names
    assert verify_root(Layout.at(tmp_path)).ok
