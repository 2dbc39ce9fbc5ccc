"""Teacher precompute throughput vs the machine's forward-only (prefill) throughput.

    python -m bench.bench_teacher [--samples 256]

Sequences = the teacher prompt (3 demonstration turns + the question) + a
48-token response, for the behaviours train rows. Measures, all in tokens of
those sequences per second:

* prefill: a bare decoder forward over the same sequences, batched by length
  (the machine's forward-only throughput for this model and these shapes);
* opsd scoring (top-20 + sampled log-prob + tail) with and without reuse of
  the shared privileged prefix, and the padding fraction with and without
  length bucketing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("bench/results/teacher.json"))
    args = ap.parse_args(argv)

    from opsd.backends.hf import HFScorer
    from opsd.config import ContextConfig
    from opsd.context.render import build_context, teacher_ids
    from opsd.data import load_rows
    from opsd.models import resolve_model_path
    from opsd.pool import ModelPool, base_policy

    policy = base_policy(resolve_model_path("smollm2-135m-instruct"))
    pool = ModelPool()
    model = pool.inference(policy, "bfloat16")
    tok = pool.tokenizer(policy)
    rows = [r for r in load_rows("behaviours") if r.split == "train"]
    g = torch.Generator().manual_seed(0)
    contexts, responses = [], []
    for i in range(args.samples):
        r = rows[i % len(rows)]
        contexts.append(teacher_ids(tok, r, build_context(r, ContextConfig())))
        n = int(torch.randint(16, 49, (1,), generator=g))
        responses.append(torch.randint(100, 40000, (n,), generator=g).tolist())
    seqs = [c + r for c, r in zip(contexts, responses)]
    total = sum(map(len, seqs))
    B = args.batch_size

    def padding(order):
        pad = 0
        for s in range(0, len(order), B):
            lens = [len(seqs[i]) for i in order[s:s + B]]
            pad += max(lens) * len(lens) - sum(lens)
        return pad / (pad + total)

    by_len = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    unsorted = list(range(len(seqs)))
    decoder = model.get_decoder()
    with torch.inference_mode():
        decoder(input_ids=torch.tensor([seqs[0][:16]]))  # warm-up
        t0 = time.perf_counter()
        for s in range(0, len(by_len), B):
            batch = [seqs[i] for i in by_len[s:s + B]]
            L = max(map(len, batch))
            ids = torch.zeros((len(batch), L), dtype=torch.long)
            for j, x in enumerate(batch):
                ids[j, :len(x)] = torch.tensor(x)
            decoder(input_ids=ids)
        prefill_s = time.perf_counter() - t0
    res = {"sequences": len(seqs), "tokens": total, "prefill_tok_s": total / prefill_s,
           "padding_fraction_unbucketed": padding(unsorted),
           "padding_fraction_bucketed": padding(by_len)}
    for share in (False, True):
        sc = HFScorer(model, batch_size=B, share_prefix=share)
        t0 = time.perf_counter()
        sc.score(contexts, responses, 20)
        dt = time.perf_counter() - t0
        res[f"scoring_tok_s_share_prefix_{share}"] = total / dt
        res[f"scoring_vs_prefill_share_prefix_{share}"] = (total / dt) / res["prefill_tok_s"]
        res[f"computed_fraction_share_prefix_{share}"] = sc.stats["tokens_computed"] / total
    print(f"{total} tokens in {len(seqs)} sequences: prefill (bare forward, length-bucketed) "
          f"{res['prefill_tok_s']:.0f} tok/s")
    for share in (False, True):
        print(f"  opsd scoring, share_prefix={share!s:<5}: {res[f'scoring_tok_s_share_prefix_{share}']:.0f} "
              f"tok/s = {res[f'scoring_vs_prefill_share_prefix_{share}'] * 100:.0f}% of prefill "
              f"(tokens actually computed: {res[f'computed_fraction_share_prefix_{share}'] * 100:.0f}%)")
    print(f"  padding: {res['padding_fraction_unbucketed'] * 100:.1f}% unbucketed → "
          f"{res['padding_fraction_bucketed'] * 100:.1f}% length-bucketed")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    return {"teacher": res}


if __name__ == "__main__":
    main()
