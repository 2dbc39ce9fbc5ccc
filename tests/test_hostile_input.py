"""Input built to hurt: a regex with catastrophic backtracking, a 10 GB file or line, YAML tags
and alias bombs in a recipe, run ids that are paths — and the source itself: no pickle, no
unsafe YAML loader, no remote code, anywhere (bench/bad_inputs.py runs the same refusals end to
end through the CLI)."""

from __future__ import annotations

import ast
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from opsd.config import ConfigError, load_config
from opsd.data import DatasetError, load_rows
from opsd.data.rows import Row
from opsd.data.specs import RegexVerifier
from opsd.data.verifiers import verify
from opsd.storage.layout import InvalidName, Layout, check_run_id

ROOT = Path(__file__).resolve().parents[1]
PATHOLOGICAL = r"(a|aa)+$"  # exponential backtracking on "aaa...b", even for the regex engine


def _row() -> Row:
    return Row(id="r", prompt="hi")


@pytest.mark.parametrize("in_thread", [False, True], ids=["main thread", "worker thread"])
def test_a_catastrophic_regex_fails_the_reply_within_its_time_limit(in_thread, monkeypatch):
    monkeypatch.setenv("OPSD_REGEX_TIMEOUT", "0.2")
    spec = RegexVerifier(pattern=PATHOLOGICAL)
    reply = "a" * 60 + "b"  # 2^60 paths: hours without a limit
    out = {}

    def check():
        t0 = time.perf_counter()
        out["verdict"] = verify(spec, reply, _row())
        out["seconds"] = time.perf_counter() - t0

    if in_thread:  # stages score replies in Prefect's worker threads
        t = threading.Thread(target=check)
        t.start()
        t.join(60)
        assert not t.is_alive(), "the verifier hung"
    else:
        check()
    assert not out["verdict"].passed and "could not be checked" in out["verdict"].feedback
    assert out["seconds"] < 30, out  # the engine checks its clock while backtracking
    # an ordinary pattern still matches as `re` would
    assert verify(RegexVerifier(pattern=r"^\s*Sure", flags="i"), "  sure thing", _row()).passed


def test_a_10_gb_dataset_file_is_refused_without_being_read(tmp_path):
    path = tmp_path / "huge.jsonl"
    with path.open("wb") as fh:  # sparse: no disk space, no time
        fh.write(b'{"prompt": "')
        fh.truncate(10 << 30)
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(DatasetError, match="over the limit of"):
        load_rows(str(path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.perf_counter() - t0 < 5 and peak < 8 << 20


def test_a_line_over_the_limit_is_refused_after_reading_only_the_limit(tmp_path):
    path = tmp_path / "long.jsonl"
    with path.open("wb") as fh:
        fh.write(b'{"id": "ok", "prompt": "fine"}\n{"prompt": "')
        fh.truncate(64 << 20)  # one 64 MiB line
    tracemalloc.start()
    with pytest.raises(DatasetError, match=r"long.jsonl:2: line is longer than the limit"):
        load_rows(str(path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 40 << 20, peak  # the 16 MiB limit (+1 byte), not the 64 MiB line


@pytest.mark.parametrize("text, message", [
    ('name: !!python/object/apply:os.system ["touch {marker}"]\n', "YAML tag !!python/object/apply"),
    ("!!python/name:os.system\n", "is not allowed"),
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcde", "bcdef")),
     "anchors and aliases expand"),
], ids=["python object tag", "python name tag", "alias bomb"])
def test_hostile_recipes_are_refused_and_never_run(text, message, tmp_path):
    marker = tmp_path / "pwned"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text.format(marker=marker))
    with pytest.raises(ConfigError, match=message):
        load_config(recipe)
    assert not marker.exists()


def test_an_oversized_recipe_is_refused(tmp_path):
    recipe = tmp_path / "big.yaml"
    with recipe.open("wb") as fh:
        fh.write(b"name: big\n#")
        fh.truncate(2 << 20)
    with pytest.raises(ConfigError, match="over the limit"):
        load_config(recipe)


@pytest.mark.parametrize("run_id", ["../escape", "a/b", "..", ".hidden", "x" * 200, "", "a\0b"])
def test_run_ids_that_would_leave_runs_are_refused(run_id, tmp_path):
    with pytest.raises(InvalidName):
        check_run_id(run_id)
    with pytest.raises(InvalidName):
        Layout.at(tmp_path).run_dir(run_id)
    assert check_run_id("20261130-043627-c102") == "20261130-043627-c102"


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func: ast.AST) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def test_no_pickle_unsafe_yaml_or_remote_code_anywhere_in_the_source():
    """What would run code from a file: pickle (also via torch.load without weights_only),
    yaml.load/unsafe_load/full_load, trust_remote_code, numpy's allow_pickle."""
    found = []
    for folder in ("opsd", "flows", "stages", "storage", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            where = path.relative_to(ROOT)
            for node in ast.walk(tree):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] + [getattr(node, "module", "") or ""]
                    bad = [n for n in names if n.split(".")[0] in ("pickle", "cloudpickle", "dill",
                                                                    "shelve", "marshal")]
                    found += [f"{where}:{node.lineno}: imports {b}" for b in bad]
            for call in _calls(tree):
                name = _name(call.func)
                kw = {k.arg: k.value for k in call.keywords}
                if name == "torch.load":
                    weights_only = kw.get("weights_only")
                    if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                        found.append(f"{where}:{call.lineno}: torch.load without weights_only=True")
                if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
                    found.append(f"{where}:{call.lineno}: {name}")
                remote = kw.get("trust_remote_code")
                if remote is not None and not (isinstance(remote, ast.Constant) and remote.value is False):
                    found.append(f"{where}:{call.lineno}: trust_remote_code")
                allow = kw.get("allow_pickle")
                if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                    found.append(f"{where}:{call.lineno}: allow_pickle")
    assert found == []
