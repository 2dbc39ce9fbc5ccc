"""Rollout throughput: opsd's generator and rollout stage vs a bare `model.generate`.

    python -m bench.bench_rollout [--batch-sizes 8 32 128]

Same model (SmolLM2-135M-Instruct, bf16 inference copy), same prompts (the
behaviours train questions), same sampling (T=1, 64 new tokens). Reports
generated tokens/s of (a) `model.generate`, (b) opsd's HFGenerator, (c) the
whole rollout stage (prompt rendering, generation, verification, Parquet
write): the pipeline overhead is (c) vs (a) at equal batch size.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("bench/results/rollout.json"))
    args = ap.parse_args(argv)

    from opsd.backends.hf import HFGenerator, SamplingParams
    from opsd.config import RolloutConfig
    from opsd.context.render import student_ids
    from opsd.data import load_rows
    from opsd.models import resolve_model_path
    from opsd.pool import ModelPool, base_policy
    from opsd.stages import rollout as rollout_stage
    from opsd.stages.common import StageContext

    policy = base_policy(resolve_model_path("smollm2-135m-instruct"))
    pool = ModelPool()
    model = pool.inference(policy, "bfloat16")
    tok = pool.tokenizer(policy)
    rows = [r for r in load_rows("behaviours") if r.split == "train"]
    results = []
    for B in args.batch_sizes:
        chunk = rows[:B]
        prompts = [student_ids(tok, r) for r in chunk]
        # warm-up (kernel selection, allocator) outside the timings
        HFGenerator(model, tok, batch_size=B).generate(prompts[:2], SamplingParams(max_new_tokens=4))

        tok.padding_side = "left"
        enc = tok.pad({"input_ids": prompts}, return_tensors="pt")
        torch.manual_seed(0)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id)
        bare_s = time.perf_counter() - t0
        new = out[:, enc["input_ids"].shape[1]:]
        eos = tok.eos_token_id
        bare_tokens = int(sum(min(len(r), (r == eos).nonzero()[0].item() + 1 if (r == eos).any() else len(r))
                              for r in new))

        gen = HFGenerator(model, tok, batch_size=B)
        t0 = time.perf_counter()
        outs = gen.generate(prompts, SamplingParams(n=1, temperature=1.0, max_new_tokens=args.max_new_tokens))
        opsd_s = time.perf_counter() - t0
        opsd_tokens = sum(len(o.response_ids) for o in outs)

        cfg = RolloutConfig(n=1, batch_size=B, shard_size=B, max_new_tokens=args.max_new_tokens)
        ctx = StageContext(out_dir=Path(tempfile.mkdtemp(prefix="opsd-bench-rollout-")), pool=pool,
                           show_progress=False)
        t0 = time.perf_counter()
        man = rollout_stage.run(cfg, chunk, policy, ctx, engine=gen)
        stage_s = time.perf_counter() - t0
        r = {
            "batch": B,
            "bare_generate_tok_s": bare_tokens / bare_s,
            "opsd_generator_tok_s": opsd_tokens / opsd_s,
            "rollout_stage_tok_s": man["response_tokens"] / stage_s,
            "pipeline_overhead_vs_bare": (bare_tokens / bare_s) / (man["response_tokens"] / stage_s) - 1,
        }
        results.append(r)
        print(f"B={B:>4}: generate {r['bare_generate_tok_s']:7.1f} tok/s | opsd generator "
              f"{r['opsd_generator_tok_s']:7.1f} | rollout stage {r['rollout_stage_tok_s']:7.1f} "
              f"(overhead vs bare generate {r['pipeline_overhead_vs_bare'] * 100:+.1f}%)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    return {"rollout": results}


if __name__ == "__main__":
    main()
