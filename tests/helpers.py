"""Plain helpers shared by test modules (fixtures live in conftest.py): tiny datasets and
configs, and the local-server helpers. Tests import this module, never each other or bench/."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from opsd.config import TrainConfig
from opsd.stages import train as train_stage
from opsd.stages.common import StageContext


DEMOS = [{"prompt": "Capital of Fiji?", "completion": "Sure thing! Suva."}] * 3
LABELS = ["dataset", "evaluate/before", "evaluate/teacher", "rollout", "teacher", "train",
          "evaluate/after"]


def write_dataset(path: Path, n_train=6, n_eval=4) -> Path:
    with path.open("w") as f:
        for i in range(n_train + n_eval):
            f.write(json.dumps({
                "id": f"q{i}", "prompt": f"Question number {i}?",
                "privileged_context": {"demonstrations": DEMOS},
                "verifier": {"type": "regex", "pattern": r"^\s*Sure", "description": "start with 'Sure'"},
                "split": "train" if i < n_train else "eval", "task": "sure" if i % 2 else "other",
            }) + "\n")
    return path


def tiny_config(model_dir: Path, data: Path) -> dict:
    return {
        "name": "tiny",
        "model": {"name": str(model_dir)},
        "data": {"source": str(data)},
        "rollout": {"n": 2, "max_new_tokens": 6, "batch_size": 8, "shard_size": 4,
                    "guidance": {"enabled": True, "threshold": 0.01, "min_teacher_prob": 0.0}},
        "teacher": {"topk": 4, "shard_size": 5},
        "train": {"epochs": 2, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-3},
        "eval": {"max_new_tokens": 6, "samples": 2},
    }


def shrunk_recipe(recipe: Path, model_dir: Path) -> dict:
    """A recipe file as a dict, its method sections kept and its sizes shrunk for the tiny model
    (6-token replies, 4-sample batches, top-4 targets, no retention)."""
    import yaml

    raw = yaml.safe_load(recipe.read_text())
    raw["model"] = {"name": str(model_dir)}
    raw["rollout"].update(max_new_tokens=6, batch_size=8)
    raw["train"].update(batch_size=4, micro_batch_size=2, lr=1e-3, logit_chunk=16)
    raw["teacher"]["topk"] = 4
    raw.setdefault("eval", {})["max_new_tokens"] = 6
    raw["retention"] = {"enabled": False}
    return raw


def online_config(model_dir: Path, data: Path, iterations=4, **over) -> dict:
    cfg = {
        "name": "tiny-online", "mode": "online",
        "model": {"name": str(model_dir)}, "data": {"source": str(data)},
        "rollout": {"n": 2, "max_new_tokens": 6, "batch_size": 8},
        "teacher": {"topk": 4},
        "train": {"batch_size": 4, "micro_batch_size": 2, "lr": 1e-3},
        "online": {"iterations": iterations, "prompts_per_iteration": 3, "eval_every": 2},
        "eval": {"max_new_tokens": 6},
    }
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    return cfg


OBJECTIVE_DEMOS = [{"prompt": "Capital of Fiji?", "completion": "Sure thing! Suva."}] * 2


def objectives_dataset(path: Path, n=6) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({
                "id": f"q{i}", "prompt": f"Question number {i}?",
                "privileged_context": {"demonstrations": OBJECTIVE_DEMOS},
                # a random model's replies pass this about half the time: both verdicts occur
                "verifier": {"type": "regex", "pattern": r"^\s\w"},
                "metadata": {"trace": {"error": ["[xyz]"]}},
                "split": "train", "task": "t",
            }) + "\n")
    return path


def train_on(a, name: str, **train) -> tuple[dict, object]:
    """Train objective ``name`` for one epoch on the ``artifacts`` fixture's rollouts/targets."""
    cfg = TrainConfig.model_validate({"epochs": 1, "batch_size": 12, "micro_batch_size": 6, "lr": 1e-3,
                                      "logit_chunk": 16, "autocast": "none", **train})
    out = a["base"] / f"train-{name}"
    out.mkdir()
    ctx = StageContext(out_dir=out, pool=a["pool"], show_progress=False)
    man = train_stage.run(cfg, a["rollouts"], a["targets"], a["policy"], ctx, teacher=a["policy"],
                          teacher_dtype="float32", rows=a["rows"], rollout_temperature=1.0)
    return man, ctx.extras["trained_model"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, what: str, timeout: float = 180) -> None:
    """Poll ``url`` until it answers; fail early if ``proc`` exits."""
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                raise AssertionError(f"{what} did not come up")
            time.sleep(1)


def synthetic_examples(n: int, prompt_len: int, resp_len: int, vocab: int, k: int, seed: int = 0):
    """Training examples with random ids and well-formed top-k targets (10 % tail mass)."""
    import numpy as np

    from opsd.training.batches import Example

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        logits_RK = rng.standard_normal((resp_len, k)).astype(np.float32)
        lp = -np.sort(-(logits_RK - np.log(np.exp(logits_RK).sum(-1, keepdims=True) / 0.9)), axis=1)
        out.append(Example(
            sample_id=f"s{i}", prompt_ids=rng.integers(0, vocab, prompt_len).tolist(),
            response_ids=rng.integers(0, vocab, resp_len).tolist(),
            behaviour_logp=np.full(resp_len, -2.0, np.float32), teacher_logp=lp[:, 0].copy(),
            topk_ids=rng.integers(0, vocab, (resp_len, k)).astype(np.int32), topk_logp=lp,
            tail=np.full(resp_len, 0.1, np.float32), group=f"g{i}"))
    return out


def run_offline_recipe(raw: dict, name: str, root: Path):
    """Validate ``raw`` as a recipe file is validated, run it through a real offline flow under
    ``root``, check the run completed with a finite result; returns (metrics, catalog, stages
    of the run by label)."""
    import math

    from opsd.config import config_from_dict
    from opsd.flows.offline import offline_flow
    from opsd.storage.catalog import Catalog
    from opsd.storage.layout import Layout

    cfg = config_from_dict(raw, name)
    metrics = offline_flow(config=cfg.model_dump(mode="json"), root=str(root), show_progress=False)
    assert math.isfinite(metrics["eval.after.greedy"])
    cat = Catalog(Layout.at(root))
    run = cat.runs()[-1]
    assert run["status"] == "completed"
    return metrics, cat, {s["label"]: s for s in cat.stages(run["run_id"])}
