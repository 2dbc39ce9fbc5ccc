"""Training throughput and model FLOPs utilisation (MFU) on a GPU, on opsd's own training path.

    python bench/bench_gpu.py                      # ~0.5B random-weight Llama, bf16, on cuda
    python bench/bench_gpu.py --tiny --device cpu  # a smoke run anywhere (what the tests do)

A random-weight Llama built from a config (no download: weights are irrelevant to speed) is
trained by ``opsd.training.trainer.Trainer`` — the same loop as the train stage: chunked LM head
and log-softmax on response positions, top-k forward KL against synthetic cached targets,
AdamW with fp32 master weights, bf16 autocast on CUDA. Reports, after ``--warmup`` steps,
response tokens/s, all tokens/s, peak GPU memory, and MFU =
(6·N + 12·L·d·T) · tokens/s / peak, where N is the non-embedding parameter count, L layers,
d hidden size, T sequence length (the standard training-FLOPs estimate) and peak the device's
dense bf16 FLOP/s (known GPUs by name, else ``--peak-tflops``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a copied checkout, not installed
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

# dense bf16 tensor-core peak, TFLOP/s: vendor datasheets (no sparsity), except the H200's,
# which is what an 8192³ bf16 product reached on the lent machine (DESIGN.md; datasheet 989)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 790.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0,
                    "L4": 121.0, "RTX 4090": 165.0}


def model_config(tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    # ≈ 0.5B parameters, Qwen2.5-0.5B-like shape with a Llama block
    return LlamaConfig(vocab_size=49152, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                       num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096,
                       tie_word_embeddings=True)


def synthetic_examples(n: int, prompt_len: int, resp_len: int, vocab: int, k: int, seed: int = 0):
    from opsd.training.batches import Example

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        logits_RK = rng.standard_normal((resp_len, k)).astype(np.float32)
        lp = logits_RK - np.log(np.exp(logits_RK).sum(-1, keepdims=True) / 0.9)  # 10 % tail mass
        lp = -np.sort(-lp, axis=1)
        resp = rng.integers(0, vocab, resp_len).tolist()
        out.append(Example(
            sample_id=f"s{i}", prompt_ids=rng.integers(0, vocab, prompt_len).tolist(), response_ids=resp,
            behaviour_logp=np.full(resp_len, -2.0, np.float32), teacher_logp=lp[:, 0].copy(),
            topk_ids=rng.integers(0, vocab, (resp_len, k)).astype(np.int32), topk_logp=lp,
            tail=np.full(resp_len, 0.1, np.float32), reward=0.0, group=f"g{i}", passed=None,
        ))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model: a smoke run, not a benchmark")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--response-len", type=int, default=768)
    ap.add_argument("--topk", type=int, default=20)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, help="device dense bf16 peak (default: by GPU name)")
    ap.add_argument("--train", action="append", default=[], metavar="KEY=VALUE",
                    help="extra TrainConfig field, e.g. --train activation_checkpointing=true")
    ap.add_argument("--out", type=Path, default=Path("bench/results/gpu.json"))
    args = ap.parse_args(argv)

    from transformers import LlamaForCausalLM

    from opsd.config import TrainConfig
    from opsd.training.trainer import Trainer

    dev = torch.device(args.device)
    cfg_m = model_config(args.tiny)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg_m).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel()
    cfg = TrainConfig.model_validate({
        "objective": "forward_kl_topk", "batch_size": args.batch, "micro_batch_size": args.micro_batch,
        "lr": 1e-5, "autocast": "bfloat16", "logit_chunk": 1024,
        "save_every": 0, **{k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.train)}})
    examples = synthetic_examples(args.batch, args.prompt_len, args.response_len, cfg_m.vocab_size,
                                  args.topk)
    # bf16 autocast on the model's device (the loop moves each micro-batch there)
    trainer = Trainer(model, cfg, pad_id=0, total_steps=args.steps)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.step(examples)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        print(f"step {step + 1}: {times[-1]:.3f} s", flush=True)
    measured = times[args.warmup:] or times
    step_s = float(np.median(measured))
    seq = args.prompt_len + args.response_len
    tokens_all = args.batch * seq
    flops_per_token = 6 * (n_params - n_embed) + 12 * cfg_m.num_hidden_layers * cfg_m.hidden_size * seq
    flops_per_token += 6 * cfg_m.hidden_size * cfg_m.vocab_size * args.response_len / seq  # LM head
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    achieved = flops_per_token * tokens_all / step_s
    res = {
        "device": name, "params": n_params, "non_embedding_params": n_params - n_embed,
        "batch": args.batch, "seq_len": seq, "response_len": args.response_len, "step_s": step_s,
        "response_tokens_per_s": args.batch * args.response_len / step_s,
        "tokens_per_s": tokens_all / step_s, "achieved_tflops": achieved / 1e12,
        "peak_bf16_tflops": peak, "mfu": achieved / (peak * 1e12) if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
        "train_overrides": args.train, "micro_batch": args.micro_batch, "step_times": times,
    }
    print(json.dumps(res, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
