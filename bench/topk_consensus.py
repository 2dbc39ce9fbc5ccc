"""How far consensus targets built from each view's top-k are from the full-vocabulary ones.

    python -m bench.topk_consensus [--k 20 50 100] [--rows 16] [--max-new-tokens 48]

vLLM's teacher scorer sees each view's top-k only (``prompt_logprobs``), so its multi-view
targets (``teacher.context.consensus``) combine the views on the union of their top-k ids
(:func:`opsd.context.consensus.combine_topk`); HF's scorer combines the full vocabulary. This
computes both on the built-in model with HF (no vLLM needed: the top-k are the HF
distributions' own, so only the combination differs): the base model's greedy replies to the
``behaviours`` eval questions, scored under two view sets (demonstrations; the rules as a system
turn), for each rule and k. Printed per (rule, k): the views' mean unreturned mass, the mean and
max |Δ| of the target's log-prob of the sampled token (nats), the share of positions whose top-1
id agrees, and the largest |Δp| over the target's top-k.
"""

from __future__ import annotations

import argparse
import time


def measure(model, tokenizer, rows, ks, max_new_tokens: int) -> list[dict]:
    import torch

    from opsd.backends.hf import HFGenerator, HFScorer, SamplingParams
    from opsd.config import ContextConfig
    from opsd.context.consensus import CONSENSUS, combine_topk
    from opsd.context.render import (
        build_context,
        student_ids,
        student_turn_ids,
        teacher_ids,
    )

    prompts = [student_ids(tokenizer, r) for r in rows]
    gens = HFGenerator(model, tokenizer, batch_size=16).generate(
        prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens))
    responses = [g.response_ids for g in gens]
    views = [[teacher_ids(tokenizer, r, build_context(r, ContextConfig(views=vs)),
                          student_turn_ids(tokenizer, r)) for r in rows]
             for vs in (["demonstrations"], ["system"])]
    scorer = HFScorer(model, batch_size=16, share_prefix=False)
    N = model.config.vocab_size
    out = []
    for mode in CONSENSUS:
        exact = scorer.score_views(views, responses, max(ks), mode, tau=1.0)
        for k in ks:
            per_view = [scorer.score(v, responses, k) for v in views]
            d_samp, top1, dp, tails = [], [], [], []
            for i, r in enumerate(responses):
                if not r:
                    continue
                s, ids, lps, _ = combine_topk(
                    torch.stack([pv[i].sampled_logprob_R for pv in per_view]),
                    torch.stack([pv[i].topk_ids_RK for pv in per_view]),
                    torch.stack([pv[i].topk_logprobs_RK for pv in per_view]),
                    torch.tensor(r), N, mode, 1.0)
                e = exact[i]
                d_samp.append((s - e.sampled_logprob_R).abs())
                top1.append((ids[:, 0] == e.topk_ids_RK[:, 0]).float())
                # the exact target's probability of each id the approximation put in its top-k
                ex_lp = torch.full_like(lps, float("-inf"))
                hit = ids.long()[:, :, None] == e.topk_ids_RK.long()[:, None, :]
                ex_lp = torch.where(hit.any(-1), (hit * e.topk_logprobs_RK[:, None, :]).sum(-1), ex_lp)
                dp.append((lps.exp() - ex_lp.exp()).abs().amax(-1))
                tails.append(torch.stack([pv[i].tail_mass_R for pv in per_view]).mean(0))
            d = torch.cat(d_samp)
            out.append({"mode": mode, "k": k, "positions": int(d.numel()),
                        "tail": float(torch.cat(tails).mean()),
                        "dlogp_mean": float(d.mean()), "dlogp_max": float(d.max()),
                        "top1": float(torch.cat(top1).mean()), "dp_max": float(torch.cat(dp).max())})
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, nargs="+", default=[20, 50, 100])
    ap.add_argument("--rows", type=int, default=16, help="behaviours eval questions")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.machine import warn_if_busy
    from opsd.data import load_rows
    from opsd.models import resolve_model_path

    warn_if_busy()
    t0 = time.perf_counter()
    path = resolve_model_path(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = [r for r in load_rows("behaviours") if r.split == "eval"][: args.rows]
    res = measure(model, tok, rows, sorted(args.k), args.max_new_tokens)
    print(f"{args.model}, {len(rows)} behaviours eval rows, greedy replies of <= "
          f"{args.max_new_tokens} tokens, views [demonstrations] vs [system], fp32 "
          f"({time.perf_counter() - t0:.0f} s)")
    print(f"{'rule':<15} {'k':>4} {'positions':>9} {'view tail':>9} {'|dlogp| mean':>12} "
          f"{'max':>7} {'top-1 same':>10} {'max |dp|':>8}")
    for r in res:
        print(f"{r['mode']:<15} {r['k']:>4} {r['positions']:>9} {r['tail']:>9.4f} "
              f"{r['dlogp_mean']:>12.4f} {r['dlogp_max']:>7.3f} {r['top1'] * 100:>9.1f}% "
              f"{r['dp_max']:>8.4f}")
    return res


if __name__ == "__main__":
    main()
