"""How often a recipe's rollouts carry what the teacher knows, under other guidance settings.

    python -m bench.guided_rollouts configs/facts/opsd.yaml [--every 2] \
        --variant '{}' --variant '{"threshold": 1.0}' \
        --variant '{"threshold": 1.0, "min_teacher_prob": 0.2, "max_per_sample": 16}'

Offline distillation learns only what its rollouts contain: a fact the student never writes is
never scored after its first token (docs/quality.md). This runs the recipe's rollout stage on
its train rows (every ``--every``-th, ``rollout.n`` samples each) with the recipe's guidance
changed by each ``--variant`` (keys of ``rollout.guidance``, plus ``temperature`` for
``rollout.temperature``) and prints, per variant: the share of samples whose reply passes the
row's verifier, the teacher tokens written per reply and the seconds taken. Rows without a
verifier (a recipe's anchor rows) are left out. No artifact is kept.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--data", default=None, help="another data.source (default: the recipe's)")
    ap.add_argument("--every", type=int, default=1, help="use every N-th train row")
    ap.add_argument("--variant", action="append", default=[],
                    help="JSON object over rollout.guidance (and temperature); repeatable")
    args = ap.parse_args(argv)

    from bench.machine import warn_if_busy
    from opsd.config import load_config
    from opsd.data import load_rows
    from opsd.device import resolve_device
    from opsd.models import resolve_model_path
    from opsd.pool import ModelPool, base_policy
    from opsd.stages import rollout as rollout_stage
    from opsd.stages.common import StageContext
    from opsd.storage.parquet import read_table

    warn_if_busy()
    cfg = load_config(args.recipe)
    rows = [r for r in load_rows(args.data or cfg.data.source)
            if r.split == "train" and r.verifier is not None][:: args.every]
    pool = ModelPool(device=resolve_device("auto"))
    policy = base_policy(resolve_model_path(cfg.model.name))
    results = []
    print(f"{len(rows)} train rows x {cfg.rollout.n} samples; guidance of {args.recipe}: "
          f"{cfg.rollout.guidance.model_dump()}, temperature {cfg.rollout.temperature}")
    for text in args.variant or ["{}"]:
        change = json.loads(text)
        temperature = change.pop("temperature", cfg.rollout.temperature)
        guidance = cfg.rollout.guidance.model_copy(update={"enabled": True, **change})
        rcfg = cfg.rollout.model_copy(update={"guidance": guidance, "temperature": temperature})
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            rollout_stage.run(rcfg, rows, policy, StageContext(Path(out), pool, False),
                              teacher=policy, context=cfg.teacher.context)
            table = read_table(Path(out)).to_pydict()
        n = len(table["passed"])
        result = {"variant": text, "passed": sum(map(bool, table["passed"])) / n,
                  "teacher_tokens_per_reply": sum(map(len, table["guided_positions"])) / n,
                  "seconds": time.perf_counter() - t0, "samples": n}
        results.append(result)
        print(f"{text:80s} passed {result['passed']:6.1%}  teacher tokens/reply "
              f"{result['teacher_tokens_per_reply']:5.2f}  {result['seconds']:5.0f} s", flush=True)
    return results


if __name__ == "__main__":
    main()
