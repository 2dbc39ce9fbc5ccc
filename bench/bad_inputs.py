"""Bad and hostile inputs and the error each gets, checked end to end through the CLI.

    python -m bench.bad_inputs                        # each case a fresh `opsd` process; writes
                                                      # the table into docs/reliability.md
    python -m bench.bad_inputs --in-process --json OUT   # what the test suite runs (faster)

Every case must be refused before any compute with exit code 2 and a message naming the
file/field and the fix, and nothing may be written: the case's folder (recipe, data, artifact
root) is listed before and after, and any file created or changed there counts. Hostile cases
also name files that must never appear (code a recipe or a model folder tries to run).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Case:
    name: str
    kind: str  # dataset | config | model | recipe | hostile | cli
    expect: str  # a fragment the message must contain
    # (workdir, model) -> (recipe dict, extra `opsd run` args), or an Invocation of any command
    build: Callable[[Path, Path], "tuple[dict, list[str]] | Invocation"]


@dataclass
class Invocation:
    """A command line to run in the case's folder; ``forbidden``: files that must not appear."""

    argv: list[str]
    forbidden: list[Path] = field(default_factory=list)
    cleanup: Callable[[], None] | None = None


def _row(i=0, **kw):
    row = {"id": f"r{i}", "prompt": "Hi?", "verifier": {"type": "regex", "pattern": "x"}}
    row.update(kw)
    return row


def _data(lines: list, name="data.jsonl", raw: bytes | None = None):
    def build(work: Path, model: Path):
        path = work / name
        if raw is not None:
            path.write_bytes(raw)
        else:
            path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
        return {"model": {"name": str(model)}, "data": {"source": str(path)}}, []
    return build


def _cfg(over: dict, args: list[str] | None = None):
    def build(work: Path, model: Path):
        data = work / "ok.jsonl"
        data.write_text(json.dumps(_row()) + "\n")
        cfg = {"model": {"name": str(model)}, "data": {"source": str(data)}}
        for k, v in over.items():
            cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
        return cfg, list(args or [])
    return build


def _model(kind: str):
    def build(work: Path, model: Path):
        data = work / "ok.jsonl"
        data.write_text(json.dumps(_row()) + "\n")
        if kind == "hub":
            name = "someone/not-a-real-model"
        elif kind == "empty-dir":
            name = str(work / "emptydir")
            (work / "emptydir").mkdir(exist_ok=True)
        elif kind == "short-context":
            import shutil

            dst = work / "shortctx"
            shutil.copytree(model, dst, dirs_exist_ok=True)
            c = json.loads((dst / "config.json").read_text())
            c["max_position_embeddings"] = 48
            (dst / "config.json").write_text(json.dumps(c))
            data.write_text(json.dumps(_row(prompt="word " * 60)) + "\n")
            name = str(dst)
        elif kind == "no-template":
            import shutil

            dst = work / "notemplate"
            shutil.copytree(model, dst, dirs_exist_ok=True)
            for f in dst.glob("chat_template*"):
                f.unlink()
            tc = json.loads((dst / "tokenizer_config.json").read_text())
            tc.pop("chat_template", None)
            (dst / "tokenizer_config.json").write_text(json.dumps(tc))
            name = str(dst)
        else:
            name = "nonsense-name"
        cfg = {"model": {"name": name}, "data": {"source": str(data)}}
        if kind == "vocab":
            cfg = {"model": {"name": str(model)}, "data": {"source": str(data)},
                   "teacher": {"kind": "external", "model": {"name": str(_other_vocab(work, model))}}}
        return cfg, []
    return build


def _other_vocab(work: Path, model: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    dst = work / "othervocab"
    if not (dst / "config.json").exists():
        tok = AutoTokenizer.from_pretrained(model)
        tok.add_tokens(["<extra_1>", "<extra_2>"])
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(dst)
        tok.save_pretrained(dst)
    return dst


DEMO = {"prompt": "q", "completion": "a"}

CASES: list[Case] = [
    Case("missing dataset file", "dataset", "file not found", lambda w, m: (
        {"model": {"name": str(m)}, "data": {"source": str(w / "nope.jsonl")}}, [])),
    Case("unsupported extension", "dataset", "unsupported file type", _data([_row()], "rows.csv")),
    Case("empty file", "dataset", "empty", _data([])),
    Case("not valid JSON", "dataset", "not valid JSON", _data(["{not json"])),
    Case("not UTF-8", "dataset", "UTF-8", _data([], raw=b"\xff\xfe\x00bad")),
    Case("row not an object", "dataset", "must be a JSON object", _data([[1, 2]])),
    Case("missing prompt", "dataset", "every row needs a 'prompt'", _data([{"id": "a"}])),
    Case("blank prompt", "dataset", "whitespace only", _data([_row(prompt="   ")])),
    Case("prompt is a number", "dataset", "expected a non-empty string", _data([_row(prompt=42)])),
    Case("message with a bad role", "dataset", "'bot' is not allowed",
         _data([_row(prompt=[{"role": "bot", "content": "x"}])])),
    Case("message content not a string", "dataset", "expected a string",
         _data([_row(prompt=[{"role": "user", "content": 3}])])),
    Case("empty message content", "dataset", "empty or whitespace",
         _data([_row(prompt=[{"role": "user", "content": " "}])])),
    Case("last turn not the user's", "dataset", "the last turn must be the user's",
         _data([_row(prompt=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])])),
    Case("empty message list", "dataset", "no messages", _data([_row(prompt=[])])),
    Case("privileged_context of wrong type", "dataset", "privileged_context",
         _data([_row(privileged_context=7)])),
    Case("demonstrations not a list", "dataset", "demonstrations",
         _data([_row(privileged_context={"demonstrations": "oops"})])),
    Case("demonstration not an object", "dataset", "demonstrations[0]",
         _data([_row(privileged_context={"demonstrations": ["oops"]})])),
    Case("demonstration without completion", "dataset", "completion",
         _data([_row(privileged_context={"demonstrations": [{"prompt": "q"}]})])),
    Case("unknown privileged view", "dataset", "unknown view 'hints'",
         _data([_row(privileged_context={"hints": "x"})])),
    Case("unknown verifier type", "dataset", "unknown verifier type 'fuzzy'",
         _data([_row(verifier={"type": "fuzzy"})])),
    Case("verifier without type", "dataset", "missing 'type'", _data([_row(verifier={"pattern": "x"})])),
    Case("verifier with a misspelt field", "dataset", "unknown field 'patern'",
         _data([_row(verifier={"type": "regex", "patern": "x"})])),
    Case("regex that does not compile", "dataset", "regex does not compile",
         _data([_row(verifier={"type": "regex", "pattern": "[a-"})])),
    Case("unknown regex flag", "dataset", "unknown regex flag",
         _data([_row(verifier={"type": "regex", "pattern": "x", "flags": "q"})])),
    Case("exact verifier without an answer", "dataset", "needs an expected answer",
         _data([_row(verifier={"type": "exact"})])),
    Case("math verifier without an answer", "dataset", "needs an expected answer",
         _data([_row(verifier={"type": "math"})])),
    Case("unknown reasoning-gym task", "dataset", "unknown reasoning-gym task",
         _data([_row(verifier={"type": "reasoning_gym", "task": "leg_countin", "entry": {}})])),
    Case("bad split", "dataset", "'test' is not allowed", _data([_row(split="test")])),
    Case("duplicate ids", "dataset", "duplicate id 'r0', also on line 1", _data([_row(0), _row(0)])),
    Case("unknown column", "dataset", "unknown column 'privileged_contex'",
         _data([_row(privileged_contex={})])),
    Case("unknown suite rule", "dataset", "unknown rule", lambda w, m: (
        {"model": {"name": str(m)}, "data": {"source": "behaviours:polite"}}, [])),
    Case("suite sizes beyond the pool", "dataset", "more than", lambda w, m: (
        {"model": {"name": str(m)}, "data": {"source": "behaviours?train=100&eval=32"}}, [])),
    Case("unknown config key", "config", "train.learning_rate: unknown key", _cfg({"train": {"learning_rate": 1}})),
    Case("value out of range", "config", "rollout.top_p", _cfg({}, ["--set", "rollout.top_p=1.5"])),
    Case("wrong value type", "config", "train.epochs", _cfg({"train": {"epochs": "two"}})),
    Case("micro batch larger than batch", "config", "micro_batch_size", _cfg({"train": {"micro_batch_size": 64}})),
    Case("guidance with the vLLM backend", "config", "rollout.guidance needs rollout.backend=hf",
         _cfg({"rollout": {"backend": "vllm", "guidance": {"enabled": True}}})),
    Case("external teacher without a model", "config", "teacher.kind=external needs teacher.model",
         _cfg({"teacher": {"kind": "external"}})),
    Case("unknown privileged view in config", "config", "unknown view",
         _cfg({"teacher": {"context": {"views": ["hints"]}}})),
    Case("consensus with one view set", "config", "at least two view sets",
         _cfg({"teacher": {"context": {"consensus": "mean_prob", "consensus_views": [["answer"]]}}})),
    Case("override without '='", "config", "must look like key.path=value", _cfg({}, ["--set", "train.lr"])),
    Case("hub model while offline", "model", "huggingface-cli download", _model("hub")),
    Case("model folder without config.json", "model", "no config.json", _model("empty-dir")),
    Case("neither built-in, folder nor hub id", "model", "neither a built-in name", _model("name")),
    Case("teacher with another vocabulary", "model", "do not share a tokenizer", _model("vocab")),
    Case("tokenizer without chat template", "model", "no chat template", _model("no-template")),
    Case("prompt longer than the model's context", "model", "over the model's limit",
         _model("short-context")),
]


# --- recipes, hostile files, models with code, the CLI ------------------------------------------

PWNED = "pwned.txt"  # what hostile input tries to create; must never exist


def _ok_data(work: Path) -> Path:
    data = work / "ok.jsonl"
    data.write_text(json.dumps(_row()) + "\n")
    return data


def _recipe_text(text: str | bytes, name: str = "recipe.yaml"):
    """``opsd run`` on a recipe file with exactly this content."""
    def build(work: Path, model: Path) -> Invocation:
        path = work / name
        body = text.replace("@MODEL@", str(model)).replace("@DATA@", str(_ok_data(work))) \
            .replace("@WORK@", str(work)) if isinstance(text, str) else text
        path.write_bytes(body.encode() if isinstance(body, str) else body)
        return Invocation(["run", str(path), "--root", str(work / "home"), "--no-progress"],
                          forbidden=[work / PWNED])
    return build


def _sparse(path: Path, prefix: bytes, size: int) -> Path:
    """A file of ``size`` bytes that takes no disk space beyond ``prefix`` (a hole of zeros)."""
    with path.open("wb") as fh:
        fh.write(prefix)
        fh.truncate(size)
    return path


def _huge(name: str, prefix: bytes, size: int):
    def build(work: Path, model: Path):
        path = _sparse(work / name, prefix, size)
        return {"model": {"name": str(model)}, "data": {"source": str(path)}}, []
    return build


def _model_folder(change: Callable[[Path], None]):
    """A copy of the tiny model with ``change`` applied to its folder."""
    def build(work: Path, model: Path):
        import shutil

        dst = work / "model"
        shutil.copytree(model, dst, dirs_exist_ok=True)
        change(dst)
        return {"model": {"name": str(dst)}, "data": {"source": str(_ok_data(work))}}, []
    return build


def _custom_code(folder: Path) -> None:
    c = json.loads((folder / "config.json").read_text())
    c.update(model_type="evilllama", auto_map={"AutoConfig": "evil.EvilConfig",
                                               "AutoModelForCausalLM": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(c))
    marker = folder.parent / PWNED
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")


def _unknown_type(folder: Path) -> None:
    c = json.loads((folder / "config.json").read_text())
    c["model_type"] = "no-such-architecture"
    (folder / "config.json").write_text(json.dumps(c))


def _cli(make: Callable[[Path, Path], list[str]], setup: Callable[[Path], None] | None = None):
    """Any opsd command; ``setup(root)`` prepares the root first (before the 'before' listing)."""
    def build(work: Path, model: Path) -> Invocation:
        root = work / "home"
        if setup is not None:
            setup(root)
        return Invocation(make(work, model))
    return build


def _run_args(*extra: str):
    """``opsd run`` of a valid recipe with extra arguments."""
    def make(work: Path, model: Path) -> list[str]:
        recipe = work / "recipe.yaml"
        recipe.write_text(json.dumps({"name": "bad", "model": {"name": str(model)},
                                      "data": {"source": str(_ok_data(work))}}))
        return ["run", str(recipe), "--no-progress", *[a.replace("@WORK@", str(work)) for a in extra]]
    return make


def _with_catalog(root: Path) -> None:
    """A root holding a catalog with one finished run 'r1' (no artifacts)."""
    from opsd.storage.catalog import Catalog
    from opsd.storage.layout import Layout

    cat = Catalog(Layout.at(root))
    cat.start_run("r1", "bad", "offline", {"name": "bad"}, "h")
    cat.finish_run("r1", "completed")


def _read_only_root(work: Path, model: Path) -> Invocation:
    """A root that exists but cannot be written: a read-only mount (root can write through any
    permission bits), else a folder without write permission."""
    import subprocess

    root = work / "home"
    root.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(root)],
                             capture_output=True).returncode == 0
    if not mounted:
        root.chmod(0o555)

    def cleanup() -> None:
        if mounted:
            subprocess.run(["umount", str(root)], capture_output=True)
        else:
            root.chmod(0o755)

    return Invocation(_run_args("--root", str(root))(work, model), cleanup=cleanup)


LAUGHS = "\n".join(["name: laughs", "a: &a [x, x, x, x, x, x, x, x, x, x]"]
                   + [f"{c}: &{c} [{', '.join(['*' + p] * 10)}]" for p, c in zip("abcdef", "bcdefg")])

CASES += [
    # recipes
    Case("recipe file not found", "recipe", "config file not found", _cli(lambda w, m: [
        "run", str(w / "nope.yaml"), "--root", str(w / "home")])),
    Case("recipe is a folder", "recipe", "not a file", _cli(lambda w, m: [
        "run", str(w), "--root", str(w / "home")])),
    Case("recipe not valid YAML", "recipe", "not valid YAML", _recipe_text("name: [unclosed\n")),
    Case("recipe top level is a list", "recipe", "must be a mapping", _recipe_text("- a\n- b\n")),
    Case("recipe not UTF-8", "recipe", "not UTF-8", _recipe_text(b"name: \xff\xfe\n")),
    Case("recipe with a python/object tag", "hostile", "YAML tag !!python/object/apply:os.system",
         _recipe_text(f'name: !!python/object/apply:os.system ["touch @WORK@/{PWNED}"]\n')),
    Case("recipe with a python/name tag", "hostile", "is not allowed",
         _recipe_text("name: x\ntrain: !!python/name:os.system\n")),
    Case("recipe whose aliases expand a billion times", "hostile", "anchors and aliases expand",
         _recipe_text(LAUGHS + "\n")),
    Case("recipe over 1 MiB", "hostile", "over the limit", lambda w, m: Invocation(
        ["run", str(_sparse(w / "big.yaml", b"name: big\n#", 2 << 20)), "--root", str(w / "home")])),
    # dataset files built to hurt
    Case("10 GB dataset file", "hostile", "over the limit of", _huge("huge.jsonl", b'{"prompt": "', 10 << 30)),
    Case("10 GB .json array", "hostile", "over the limit of", _huge("huge.json", b"[", 10 << 30)),
    Case("10 GB Parquet file", "hostile", "over the limit of", _huge("huge.parquet", b"PAR1", 10 << 30)),
    Case("one line of 64 MiB", "hostile", "line is longer than the limit",
         _huge("longline.jsonl", b'{"prompt": "', 64 << 20)),
    Case("regex pattern of 5000 characters", "hostile", "at most 4096 characters",
         _data([_row(verifier={"type": "regex", "pattern": "a" * 5000})])),
    Case("Parquet file that is not Parquet", "dataset", "cannot read Parquet",
         _data([], "rows.parquet", raw=b"not parquet at all")),
    Case(".json that is not an array", "dataset", "expected a JSON array",
         _data([], "rows.json", raw=b'{"prompt": "x"}')),
    Case("dataset path is a folder", "dataset", "file not found", lambda w, m: (
        {"model": {"name": str(m)}, "data": {"source": str(w)}}, [])),
    # models
    Case("model folder with its own code (auto_map)", "hostile", "never runs code",
         _model_folder(_custom_code)),
    Case("model_type transformers does not know", "model", "is not an architecture",
         _model_folder(_unknown_type)),
    Case("config.json not JSON", "model", "cannot be read as JSON",
         _model_folder(lambda f: (f / "config.json").write_text("{oops"))),
    # the command line
    Case("--set of a wrong type", "cli", "train.epochs", _cli(_run_args("--set", "train.epochs=abc"))),
    Case("--set of an unknown key", "cli", "unknown key", _cli(_run_args("--set", "train.nope=1"))),
    Case("--set below a value", "cli", "train.lr", _cli(_run_args("--set", "train.lr.x=1"))),
    Case("--set of an unknown mode", "cli", "mode", _cli(_run_args("--set", "mode=batch"))),
    Case("--set with a YAML tag", "hostile", "train.epochs", _cli(_run_args(
        "--set", f"train.epochs=!!python/object/apply:os.system ['touch @WORK@/{PWNED}']"))),
    Case("--run-id that climbs out of runs/", "hostile", "is not allowed",
         _cli(_run_args("--run-id", "../../escape"))),
    Case("--run-id with a slash", "cli", "is not allowed", _cli(_run_args("--run-id", "a/b"))),
    Case("--data of a missing file", "cli", "file not found", _cli(_run_args("--data", "@WORK@/nope.jsonl"))),
    Case("root that is a file", "cli", "is a file", lambda w, m: Invocation(
        _run_args("--root", str(_sparse(w / "rootfile", b"x", 1)))(w, m))),
    Case("root below a file", "cli", "cannot be created", lambda w, m: Invocation(
        _run_args("--root", str(_sparse(w / "afile", b"x", 1) / "home"))(w, m))),
    Case("read-only root", "cli", "cannot write to the artifact root", _read_only_root),
    Case("unknown stage", "cli", "unknown stage 'distil'", _cli(lambda w, m: [
        "stage", "distil", "--run", "r1", "--root", str(w / "home")], _with_catalog)),
    Case("stage without a run id", "cli", "Missing option '--run'", _cli(lambda w, m: [
        "stage", "train", "--root", str(w / "home")], _with_catalog)),
    Case("stage of a run not in the catalog", "cli", "no run 'nope'", _cli(lambda w, m: [
        "stage", "train", "--run", "nope", "--root", str(w / "home")], _with_catalog)),
    Case("stage on a root without a catalog", "cli", "no catalog", _cli(lambda w, m: [
        "stage", "train", "--run", "r1", "--root", str(w / "home")])),
    Case("stage with --set of a wrong type", "cli", "train.epochs", _cli(lambda w, m: [
        "stage", "train", "--run", "r1", "--set", "train.epochs=abc", "--root", str(w / "home")],
        _with_catalog)),
    Case("verify of a run not in the catalog", "cli", "no run 'nope'", _cli(lambda w, m: [
        "verify", "--run", "nope", "--root", str(w / "home")], _with_catalog)),
    Case("track of a run not in the catalog", "cli", "no run 'nope'", _cli(lambda w, m: [
        "track", "--run", "nope", "--root", str(w / "home")], _with_catalog)),
    Case("artifacts of a run not in the catalog", "cli", "no run 'nope'", _cli(lambda w, m: [
        "artifacts", "--run", "nope", "--root", str(w / "home")], _with_catalog)),
    Case("query that is not SQL", "cli", "tables: runs, stages, artifacts", _cli(lambda w, m: [
        "query", "SELEKT 1", "--root", str(w / "home")], _with_catalog)),
]


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder`` with (size, mtime) — what 'nothing written' compares."""
    out = {}
    for p in [folder, *folder.rglob("*")] if folder.exists() else []:
        try:
            st = p.lstat()
        except OSError:
            continue
        out[str(p.relative_to(folder))] = (st.st_size if p.is_file() else 0, st.st_mtime_ns)
    return out


# Files opsd may touch without writing anything: lock files of a catalog that already existed
# (a reader takes the lock) — never created or grown by a refused command.
_LOCKS = (".lock",)


def run_case(case: Case, work: Path, model: Path, subprocess_run: bool = False) -> dict:
    """Run the case's command in this process (``CliRunner``) or, as a user runs it, in a fresh
    process (Prefect's console log handler outlives one in-process CLI call)."""
    work.mkdir(parents=True, exist_ok=True)
    built = case.build(work, model)
    if isinstance(built, Invocation):
        inv = built
    else:
        cfg, args = built
        recipe = work / "recipe.yaml"
        recipe.write_text(json.dumps({"name": "bad", **cfg}))
        inv = Invocation(["run", str(recipe), "--root", str(work / "home"), "--no-progress", *args])
    before = _listing(work)
    try:
        exit_code, output = _invoke(inv.argv, work, subprocess_run)
        after = _listing(work)
    finally:
        if inv.cleanup is not None:
            inv.cleanup()
    written = sorted(p for p, stat in after.items()
                     if before.get(p) != stat and not p.endswith(_LOCKS) and p != ".")
    written += [f"{f} (hostile input ran)" for f in inv.forbidden if f.exists()]
    message = output.strip().splitlines()
    return {
        "case": case.name, "kind": case.kind, "exit_code": exit_code,
        "message": next((line for line in message if case.expect in line),
                        message[-1] if message else ""),
        "expected_fragment_found": case.expect in output,
        "written": written,
    }


def _invoke(argv: list[str], work: Path, subprocess_run: bool) -> tuple[int, str]:
    if subprocess_run:
        import subprocess

        proc = subprocess.run([sys.executable, "-m", "opsd.cli", *argv], capture_output=True,
                              text=True, cwd=work, env={**os.environ, "PYTHONPATH": str(REPO),
                                                        "HF_HUB_OFFLINE": "1"})
        return proc.returncode, proc.stdout + proc.stderr
    from typer.testing import CliRunner

    from opsd.cli import app

    cwd = os.getcwd()
    os.chdir(work)  # a relative default root (./opsd-home) would land in the case's folder
    try:
        res = CliRunner().invoke(app, argv)
    finally:
        os.chdir(cwd)
    return res.exit_code, (res.output or "") + (str(res.exception) if res.exit_code not in (0, 2)
                                                  and res.exception else "")

def table(results: list[dict]) -> str:
    lines = ["| # | kind | bad input | exit | message (abridged) | written |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(results, 1):
        msg = r["message"].replace("|", "\\|")
        if len(msg) > 160:
            msg = msg[:157] + "..."
        lines.append(f"| {i} | {r['kind']} | {r['case']} | {r['exit_code']} | `{msg}` | "
                     f"{'nothing' if not r['written'] else ', '.join(r['written'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--in-process", action="store_true",
                    help="run every case in this process (faster; the default starts `opsd` per case)")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "bad_inputs.json",
                    help="per-case results")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/reliability.md")
    ap.add_argument("--only", nargs="*", help="run only the cases whose names contain one of these")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bench.fault_injection import tiny_model

    base = Path(tempfile.mkdtemp(prefix="opsd-bad-inputs-"))
    model = tiny_model(base / "tiny")
    cases = [c for c in CASES if not args.only or any(o in c.name for o in args.only)]
    results = [run_case(c, base / f"case{i}", model, subprocess_run=not args.in_process)
               for i, c in enumerate(cases)]
    refused = sum(r["exit_code"] == 2 and r["expected_fragment_found"] for r in results)
    clean = sum(not r["written"] for r in results)
    ok = all(r["exit_code"] == 2 and r["expected_fragment_found"] and not r["written"] for r in results)
    text = table(results)
    print(text)
    print(f"\n{len(results)} bad inputs, {refused} refused with exit 2 and the expected message, "
          f"{clean} wrote nothing")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    if not args.no_docs and not args.only:
        from bench.docs import write_section

        summary = (f"{len(results)} bad inputs, {refused} refused with exit code 2 and a message "
                   f"naming the problem before any compute, {clean} left nothing written (no file "
                   "created or changed in the case's folder, no code from a hostile recipe or model "
                   "run). Command: `python -m bench.bad_inputs` (each case a fresh `opsd` process).")
        write_section(REPO / "docs" / "reliability.md", "reliability:bad-inputs", f"{summary}\n\n{text}",
                      "Bad inputs")
    import shutil

    shutil.rmtree(base, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
