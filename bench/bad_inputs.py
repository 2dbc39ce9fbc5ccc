"""Bad inputs and the error each gets, checked end to end through `opsd run`.

    python -m bench.bad_inputs            # prints the table, writes docs/reliability.md

Every case must be refused before any compute with exit code 2, a message
naming the file/field and the fix, and nothing written under the artifact root
(no catalog, no MLflow store).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Case:
    name: str
    kind: str  # dataset | config | model
    expect: str  # a fragment the message must contain
    build: Callable[[Path, Path], tuple[dict, list[str]]]  # (workdir, model) -> (recipe, extra args)


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


def run_case(case: Case, work: Path, model: Path, subprocess_run: bool = False) -> dict:
    """``opsd run`` on the case's recipe: in this process (tests) or as a user runs it, in a
    fresh process (the script: Prefect's console log handler outlives one in-process CLI call)."""
    work.mkdir(parents=True, exist_ok=True)
    cfg, args = case.build(work, model)
    recipe = work / "recipe.yaml"
    recipe.write_text(json.dumps({"name": "bad", **cfg}))
    root = work / "home"
    argv = ["run", str(recipe), "--root", str(root), "--no-progress", *args]
    if subprocess_run:
        import subprocess

        proc = subprocess.run([sys.executable, "-m", "opsd.cli", *argv], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
        exit_code, output = proc.returncode, proc.stdout + proc.stderr
    else:
        from typer.testing import CliRunner

        from opsd.cli import app

        res = CliRunner().invoke(app, argv)
        exit_code, output = res.exit_code, res.output or ""
    written = sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []
    message = output.strip().splitlines()
    return {
        "case": case.name, "kind": case.kind, "exit_code": exit_code,
        "message": next((line for line in message if case.expect in line),
                        message[-1] if message else ""),
        "expected_fragment_found": case.expect in output,
        "written": written,
    }


def table(results: list[dict]) -> str:
    lines = ["| # | kind | bad input | exit | message (abridged) | written |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(results, 1):
        msg = r["message"].replace("|", "\\|")
        if len(msg) > 160:
            msg = msg[:157] + "..."
        lines.append(f"| {i} | {r['kind']} | {r['case']} | {r['exit_code']} | `{msg}` | "
                     f"{'nothing' if not r['written'] else ', '.join(r['written'])} |")
    return "\n".join(lines)


def main() -> int:
    sys.path.insert(0, str(REPO))
    from bench.fault_injection import tiny_model

    base = Path(tempfile.mkdtemp(prefix="opsd-bad-inputs-"))
    model = tiny_model(base / "tiny")
    results = [run_case(c, base / f"case{i}", model, subprocess_run=True) for i, c in enumerate(CASES)]
    ok = all(r["exit_code"] == 2 and r["expected_fragment_found"] and not r["written"] for r in results)
    text = table(results)
    print(text)
    print(f"\n{len(results)} bad inputs, {sum(r['exit_code'] == 2 for r in results)} refused with exit 2, "
          f"{sum(not r['written'] for r in results)} wrote nothing")
    out = REPO / "bench" / "results" / "bad_inputs.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    from bench.docs import write_section

    summary = (f"{len(results)} bad inputs, {sum(r['exit_code'] == 2 for r in results)} refused "
               f"with exit code 2 before any compute, {sum(not r['written'] for r in results)} "
               "left nothing under the artifact root. Command: `python -m bench.bad_inputs`.")
    write_section(REPO / "docs" / "reliability.md", "reliability:bad-inputs", f"{summary}\n\n{text}",
                  "Bad inputs")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
