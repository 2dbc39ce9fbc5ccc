"""HF vs vLLM throughput on SmolLM2-135M: rollouts and teacher scoring.

    python bench/bench_vllm.py                       # fp32 and bf16, batches 8/32/128
    python bench/bench_vllm.py --dtypes float32 --batch-sizes 8 32

Rollouts: ``B`` prompts x 1 sample, temperature 1.0, 64 new tokens; tokens/s =
generated tokens / wall time. Teacher scoring: the vLLM rollouts of the same
``B`` prompts, scored after a privileged context (two demonstration turns) with
top-20 targets; tokens/s = scored response tokens / wall time (the context
tokens are computed too; ``ctx_tok`` in the JSON counts them). Each engine is
warmed up once before timing; HF runs with ``batch_size=B``, vLLM gets all ``B``
requests at once and schedules them itself. Also records parity figures
(greedy token agreement, teacher top-1 MAD and sampled-token correlation) per
dtype. Prints a table and writes JSON (default ``bench/results/vllm.json``).

vLLM starts worker processes: keep the ``__main__`` guard.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TOPICS = [
    "the moon", "rain", "volcanoes", "bees", "the ocean", "trains", "chess", "bread", "owls",
    "music", "glaciers", "coffee", "maps", "deserts", "robots", "gardens",
]
ASKS = [
    "Tell me a fun fact about {t}.", "Write two sentences about {t}.", "Why do people like {t}?",
    "Explain {t} to a child.", "Give me three words that describe {t}.", "What is special about {t}?",
    "Write a short poem about {t}.", "Describe {t} in one paragraph.",
]
DEMOS = [("Capital of Fiji?", "Sure thing! Suva."), ("Largest ocean?", "Sure thing! The Pacific."),
         ("A colour of the sky?", "Sure thing! Blue.")]


def _ids(tok, messages) -> list[int]:
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def build_inputs(tok, n: int):
    questions = [ASKS[i % len(ASKS)].format(t=TOPICS[(i // len(ASKS)) % len(TOPICS)])
                 + ("" if i < len(ASKS) * len(TOPICS) else f" (#{i})") for i in range(n)]
    demo = [m for q, a in DEMOS for m in ({"role": "user", "content": q},
                                          {"role": "assistant", "content": a})]
    prompts = [_ids(tok, [{"role": "user", "content": q}]) for q in questions]
    contexts = [_ids(tok, demo + [{"role": "user", "content": q}]) for q in questions]
    return prompts, contexts


def _timed(fn, repeats: int = 1):
    """(output of the last run, best wall time): best-of-n damps a shared machine's noise."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def run(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import vllm
    from opsd.backends.hf import HFGenerator, HFScorer, SamplingParams, cast_for_inference
    from opsd.backends.vllm import VLLMGenerator, VLLMScorer, close_all
    from opsd.models import resolve_model_path
    from opsd.pool import Policy

    path = Path(args.model) if args.model else resolve_model_path("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(path)
    master = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts, contexts = build_inputs(tok, max(args.batch_sizes))
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    rows, parity, engine_start = [], {}, {}

    def record(dtype, task, engine, B, tokens, seconds, **extra):
        row = {"dtype": dtype, "task": task, "engine": engine, "batch": B, "tokens": tokens,
               "seconds": round(seconds, 3), "tok_per_s": round(tokens / seconds, 1),
               "load_avg_1m": round(os.getloadavg()[0], 2), **extra}
        rows.append(row)
        print(f"  {dtype:8s} {task:8s} {engine:4s} B={B:<4d} {tokens:6d} tok {seconds:7.2f} s "
              f"{row['tok_per_s']:8.1f} tok/s  (load {row['load_avg_1m']})", flush=True)

    for dtype in args.dtypes:
        print(f"== {dtype}", flush=True)
        model = cast_for_inference(master, dtypes[dtype])
        cfg = SimpleNamespace(dtype=dtype, topk=args.topk)
        (gen, t_start) = _timed(lambda: VLLMGenerator.for_policy(cfg, Policy(f"bench-{dtype}", path, "bench")))
        # The teacher gets its own engine, as in the pipeline (block size 32, prefix cache on).
        scorer, t_start2 = _timed(lambda: VLLMScorer.for_policy(
            SimpleNamespace(dtype=dtype, topk=args.topk, share_prefix=True), Policy(f"bench-{dtype}", path, "bench")))
        t_start = max(t_start, t_start2)
        hf_gen = lambda B: HFGenerator(model, tok, batch_size=B)  # noqa: E731
        hf_sc = lambda B: HFScorer(model, batch_size=B)  # noqa: E731
        print(f"  vLLM engine start {t_start:.1f} s", flush=True)
        engine_start[dtype] = round(t_start, 1)

        # Warm-up (first calls pay one-off kernel set-up in both engines).
        warm = SamplingParams(n=1, temperature=1.0, max_new_tokens=8, seed=0)
        hf_gen(4).generate(prompts[:4], warm)
        w = gen.generate(prompts[:4], warm)
        hf_sc(4).score(contexts[:4], [g.response_ids for g in w], args.topk)
        scorer.score(contexts[:4], [g.response_ids for g in w], args.topk)

        for B in args.batch_sizes:
            params = SamplingParams(n=1, temperature=1.0, top_p=1.0, max_new_tokens=args.new_tokens, seed=B)
            R = args.repeats
            hg, s = _timed(lambda: hf_gen(B).generate(prompts[:B], params), R)
            record(dtype, "rollout", "hf", B, sum(len(g.response_ids) for g in hg), s)
            vg, s = _timed(lambda: gen.generate(prompts[:B], params), R)
            record(dtype, "rollout", "vllm", B, sum(len(g.response_ids) for g in vg), s)
            resp = [g.response_ids for g in vg]
            n_resp = sum(map(len, resp))
            n_ctx = sum(map(len, contexts[:B]))
            ht, s = _timed(lambda: hf_sc(B).score(contexts[:B], resp, args.topk), R)
            record(dtype, "teacher", "hf", B, n_resp, s, ctx_tok=n_ctx)
            st0 = dict(scorer.stats)
            vt, s = _timed(lambda: scorer.score(contexts[:B], resp, args.topk), R)
            record(dtype, "teacher", "vllm", B, n_resp, s, ctx_tok=n_ctx,
                   cached_tok=scorer.stats["cached_tokens"] - st0["cached_tokens"],
                   rescored=scorer.stats["rescored"] - st0["rescored"])
            if B == args.parity_batch:
                t1v = torch.cat([t.topk_logprobs_RK[:, 0] for t in vt])
                t1h = torch.cat([t.topk_logprobs_RK[:, 0] for t in ht])
                sv = torch.cat([t.sampled_logprob_R for t in vt])
                sh = torch.cat([t.sampled_logprob_R for t in ht])
                parity[dtype] = {
                    "teacher_tokens": int(sv.numel()),
                    "top1_logprob_mad": round(float((t1v - t1h).abs().mean()), 5),
                    "sampled_logprob_corr": round(float(torch.corrcoef(torch.stack([sv, sh]))[0, 1]), 5),
                    "sampled_logprob_mad": round(float((sv - sh).abs().mean()), 5),
                    "top1_id_agreement": round(float(torch.cat(
                        [(a.topk_ids_RK[:, 0] == b.topk_ids_RK[:, 0]) for a, b in zip(vt, ht)]
                    ).float().mean()), 4),
                }
        greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=args.new_tokens)
        gh = hf_gen(args.parity_batch).generate(prompts[: args.parity_batch], greedy)
        gv = gen.generate(prompts[: args.parity_batch], greedy)
        same = sum(x == y for a, b in zip(gh, gv) for x, y in zip(a.response_ids, b.response_ids))
        total = sum(max(len(a.response_ids), len(b.response_ids)) for a, b in zip(gh, gv))
        parity.setdefault(dtype, {})["greedy_token_agreement"] = round(same / total, 4)
        parity[dtype]["greedy_tokens"] = total
        print(f"  parity {dtype}: {parity[dtype]}", flush=True)
        close_all()
        del model

    return {
        "model": str(path),
        "new_tokens": args.new_tokens,
        "topk": args.topk,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "versions": {"torch": torch.__version__, "vllm": vllm.__version__,
                     "transformers": __import__("transformers").__version__},
        "env": {k: os.environ[k] for k in os.environ if k.startswith(("VLLM_CPU", "OMP_"))},
        "hf_torch_threads": torch.get_num_threads(),
        "results": rows,
        "parity": parity,
        "vllm_engine_start_s": engine_start,
    }


def table(report: dict) -> str:
    cells: dict[tuple, float] = {}
    for r in report["results"]:
        cells[(r["dtype"], r["task"], r["batch"], r["engine"])] = r["tok_per_s"]
    lines = ["| dtype | task | batch | HF tok/s | vLLM tok/s | vLLM / HF |", "|---|---|---|---|---|---|"]
    for dtype, task, B in sorted({k[:3] for k in cells}, key=lambda k: (k[0], k[1], k[2])):
        h, v = cells.get((dtype, task, B, "hf")), cells.get((dtype, task, B, "vllm"))
        ratio = f"{v / h:.2f}x" if h and v else "-"
        lines.append(f"| {dtype} | {task} | {B} | {h} | {v} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF model folder (default: built-in SmolLM2-135M)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 32, 128])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--topk", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per cell; the best counts")
    p.add_argument("--hf-threads", type=int, default=1,
                   help="torch threads for the HF engine; 1 matches vLLM-CPU, which binds one "
                   "compute thread on a 2-core machine (0: torch's default)")
    p.add_argument("--parity-batch", type=int, default=32, help="batch whose outputs feed the parity figures")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "vllm.json"))
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.hf_threads:
        import torch

        torch.set_num_threads(args.hf_threads)
    # SIGTERM -> SystemExit, so the finally below shuts the engine's worker processes down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        report = run(args)
    finally:
        from opsd.backends.vllm import close_all

        close_all()
    report["args"] = vars(args)
    report["table_markdown"] = table(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(report["table_markdown"])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
