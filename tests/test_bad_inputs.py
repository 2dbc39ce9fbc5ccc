"""Bad inputs are refused before any compute, with a message naming the problem, and
nothing is written under the artifact root."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from opsd.cli import app


def _recipe(tmp_path: Path, model: str, data: str, **extra) -> Path:
    cfg = {"name": "bad", "model": {"name": model}, "data": {"source": data}, **extra}
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(cfg))
    return path


def _run(tmp_path, recipe, *args):
    root = tmp_path / "home"
    res = CliRunner().invoke(app, ["run", str(recipe), "--root", str(root), "--no-progress", *args])
    return res, root


def _good_row(i=0, **kw):
    row = {"id": f"r{i}", "prompt": "Hi?", "verifier": {"type": "regex", "pattern": "x"}}
    row.update(kw)
    return row


@pytest.mark.parametrize(
    "lines, expect",
    [
        ([], "empty"),
        (["{not json"], "not valid JSON"),
        ([json.dumps({"id": "a"})], "prompt"),
        ([json.dumps(_good_row(verifier={"type": "fuzzy"}))], "unknown verifier type"),
        ([json.dumps(_good_row(0)), json.dumps(_good_row(0))], "duplicate id"),
        ([json.dumps(_good_row(privileged_context={"demonstrations": "oops"}))], "demonstrations"),
    ],
)
def test_bad_dataset_refused_before_anything_is_written(tmp_path, tiny_model_dir, lines, expect):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + ("\n" if lines else ""))
    res, root = _run(tmp_path, _recipe(tmp_path, str(tiny_model_dir), str(data)))
    assert res.exit_code == 2
    assert expect in res.output and "data.jsonl" in res.output
    assert not (root / "catalog.duckdb").exists()


def test_unknown_config_key_lists_allowed_keys(tmp_path, tiny_model_dir):
    recipe = _recipe(tmp_path, str(tiny_model_dir), "behaviours", train={"learning_rate": 1})
    res, root = _run(tmp_path, recipe)
    assert res.exit_code == 2 and "train.learning_rate: unknown key" in res.output and "lr" in res.output
    assert not root.exists()


def test_out_of_range_value_names_the_range(tmp_path, tiny_model_dir):
    res, _ = _run(tmp_path, _recipe(tmp_path, str(tiny_model_dir), "behaviours"), "--set", "rollout.top_p=1.5")
    assert res.exit_code == 2 and "rollout.top_p" in res.output and "less than or equal to 1" in res.output


def test_missing_model_folder_and_offline_hub_id(tmp_path):
    res, root = _run(tmp_path, _recipe(tmp_path, "someone/not-a-real-model", "behaviours"))
    assert res.exit_code == 2 and "HF_HUB_OFFLINE" in res.output and "huggingface-cli download" in res.output
    assert not (root / "catalog.duckdb").exists()


def test_teacher_with_other_vocabulary_is_refused(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_tokens(["<extra_tok_1>", "<extra_tok_2>"])
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(other)
    tok.save_pretrained(other)
    recipe = _recipe(tmp_path, str(tiny_model_dir), "behaviours",
                     teacher={"kind": "external", "model": {"name": str(other)}})
    res, root = _run(tmp_path, recipe)
    assert res.exit_code == 2
    assert "do not share a tokenizer" in res.output and "vocab_size" in res.output
    assert not (root / "catalog.duckdb").exists()
