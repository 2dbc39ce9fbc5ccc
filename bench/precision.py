"""Training precision: fp32 master weights + bf16 autocast (opsd) against the alternatives.

    python bench/precision.py [--device cpu] [--steps 4]

Three ways to train the same random-weight Llama (SmolLM2-135M's shape unless ``--small``) on the
same synthetic distillation batches, each through opsd's own loss (chunked LM head, top-k forward
KL):

* ``fp32-master+autocast`` — opsd's choice: fp32 weights, gradients and AdamW moments; forward and
  backward under bf16 autocast (16 bytes per parameter);
* ``bf16-weights+fp32-master`` — bf16 weights and gradients, the optimiser keeping an fp32 master
  copy and fp32 moments that it copies back after every step (2 + 2 + 4 + 8 = 16 bytes);
* ``pure-bf16`` — bf16 weights, gradients and AdamW moments (2 + 2 + 4 = 8 bytes).

Reports the median step time and, after the steps, how far each run's weights are from the
fp32-master run's, and the share of weight elements whose update the last step lost to bf16
rounding (the bf16 weight did not move although the fp32 update was non-zero).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def build(small: bool, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    if small:
        cfg = LlamaConfig(vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    else:  # SmolLM2-135M's shape
        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(cfg)


def step_loss(model, batch, cfg):
    from opsd.training.loss import micro_batch_loss

    return micro_batch_loss(model, batch, cfg, 1.0 / max(1, batch.n_tokens))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--response-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--small", action="store_true", help="a 4-layer model (a smoke run)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import synthetic_examples  # the tests' synthetic targets (a plain module)

    from opsd.config import TrainConfig
    from opsd.training.batches import collate

    dev = torch.device(args.device)
    base = build(args.small, dev)
    examples = synthetic_examples(args.batch, args.prompt_len, args.response_len,
                                  base.config.vocab_size, 20)
    batch = collate(examples, 0)
    runs: dict[str, dict] = {}

    def run(name: str, model, autocast: str, master: bool):
        cfg = TrainConfig(autocast=autocast, logit_chunk=256, activation_checkpointing=False,
                          batch_size=args.batch, micro_batch_size=args.batch)
        params = [p for p in model.parameters()]
        fp32 = [p.detach().float().clone().requires_grad_() for p in params] if master else params
        opt = torch.optim.AdamW(fp32, lr=args.lr, fused=all(p.dtype == torch.float32 for p in fp32)
                                or None)
        times, lost = [], 0.0
        start = {n: p.detach().float().clone() for n, p in model.named_parameters()}
        model.train()
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step_loss(model, batch, cfg)
            if master:
                for p, m in zip(params, fp32):
                    m.grad = p.grad.float()
                    p.grad = None
            before = [p.detach().clone() for p in params]
            ref = [m.detach().clone() for m in fp32]
            opt.step()
            opt.zero_grad(set_to_none=True)
            if master:
                with torch.no_grad():
                    for p, m in zip(params, fp32):
                        p.copy_(m)
            times.append(time.perf_counter() - t0)
            # updates lost to rounding: fp32 update non-zero, the weight itself unchanged
            if master:  # the fp32 master moved, the bf16 weight did not
                stuck = sum(int(((m.detach() != r) & (p.detach() == b)).sum())
                            for p, b, m, r in zip(params, before, fp32, ref))
            else:  # a non-zero AdamW step (first moment != 0) that left the weight unchanged
                stuck = sum(int(((opt.state[p]["exp_avg"] != 0) & (p.detach() == b)).sum())
                            for p, b in zip(params, before))
            lost = stuck / sum(p.numel() for p in params)
        runs[name] = {"step_s": statistics.median(times[1:] or times), "steps": times,
                      "lost_update_fraction_last_step": lost if name != "fp32-master+autocast" else 0.0,
                      # how far training moved each weight (from this run's own initial weights)
                      "moved": {n: p.detach().float() - start[n] for n, p in model.named_parameters()}}
        print(f"{name}: median step {runs[name]['step_s']:.3f} s, lost updates {lost:.3%}",
              flush=True)

    run("fp32-master+autocast", copy.deepcopy(base), "bfloat16", master=False)
    run("bf16-weights+fp32-master", copy.deepcopy(base).to(torch.bfloat16), "none", master=True)
    run("pure-bf16", copy.deepcopy(base).to(torch.bfloat16), "none", master=False)
    ref = runs["fp32-master+autocast"]["moved"]
    out = {"device": str(dev), "model_params": sum(p.numel() for p in base.parameters()),
           "settings": {k: str(v) for k, v in vars(args).items()}, "runs": {}}
    ref_norm = sum(float(v.norm() ** 2) for v in ref.values()) ** 0.5
    for name, r in runs.items():
        # relative error of the total weight change against the fp32-master run's
        err = sum(float((r["moved"][n] - ref[n]).norm() ** 2) for n in ref) ** 0.5 / ref_norm
        out["runs"][name] = {"step_s": r["step_s"], "step_vs_fp32_master": r["step_s"] / runs[
            "fp32-master+autocast"]["step_s"], "update_error_vs_fp32_master": err,
            "lost_update_fraction_last_step": r["lost_update_fraction_last_step"]}
    print(json.dumps(out, indent=2))
    if args.out:
        args.out.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
