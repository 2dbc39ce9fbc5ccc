"""opsd's stages on one GPU, against the device's limits: the check a lent H200 runs in one go.

    python bench/gpu_pipeline.py                                  # H200: Qwen3-0.6B and 1.7B shapes
    python bench/gpu_pipeline.py --tiny --device cpu --out x.json # a smoke run anywhere (the tests)

For each model shape it builds a random-weight model from a transformers ``Qwen3Config`` (no
download: the weights do not change the speed) and a synthetic word-level tokenizer (token ``tN``
is id N; a chat template of plain words), writes synthetic rows whose teacher sees a privileged
context (a system rule and three demonstration turns), and calls opsd's *stage functions* on the
device, in order:

1. ``rollout``  — the student samples ``--rollouts`` replies of ``--new-tokens`` tokens (HF
   backend, KV cache preallocated per batch); decode is also timed on its own (generation of
   ``--new-tokens`` minus a one-token generation, same prompts) and set against the HBM floor;
2. ``teacher``  — the teacher scores every reply with its privileged context (prefill only);
3. ``train``    — two epochs of the offline train stage over those targets;
4. ``evaluate`` — greedy held-out replies;
5. one online iteration with the models resident: rollout (``--rollouts`` × ``--new-tokens``),
   teacher, one optimiser step over all the samples, the sampling copy refreshed.

Per stage: seconds, tokens/s, model FLOP utilisation (MFU: model FLOPs ÷ seconds ÷ the bf16 peak,
``--peak-tflops``, 790 for an H200 as measured there; recomputation is not counted), decode step
time against the HBM floor (bytes of weights + KV cache read per step ÷ ``--hbm-tbs``, 4.3 TB/s
on an H200), peak device memory. Prints a table and writes JSON (``--out``).

Imports only what a bare GPU machine has (torch, transformers, numpy, pyarrow, tqdm, pyyaml) plus
pydantic, which opsd's config needs (carry it as wheels: docs/benchmarks.md has the command);
no Prefect, MLflow or DuckDB — the stages are plain functions (tests/test_gpu_pipeline.py
runs this script with those three blocked).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a copied checkout, not installed
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PEAK_TFLOPS = 790.0  # H200 bf16 dense matmul, measured on the lent machine (DESIGN.md)
HBM_TBS = 4.3  # H200 device copy bandwidth, measured there

# random-weight shapes of the real models (their config.json values)
SHAPES = {
    "qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, tie_word_embeddings=True),
    "qwen3-1.7b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, tie_word_embeddings=True),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 tie_word_embeddings=True),
}
SPECIAL = ["<pad>", "<eos>", "<im_start>", "<im_end>", "system", "user", "assistant"]
CHAT_TEMPLATE = ("{% for m in messages %}<im_start> {{ m['role'] }} {{ m['content'] }} <im_end> "
                 "{% endfor %}{% if add_generation_prompt %}<im_start> assistant {% endif %}")


# ------------------------------------------------------------------ model, tokenizer, rows


def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer over ``vocab_size`` ids: the specials, then ``t7 .. tN``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL)}
    vocab.update({f"t{i}": i for i in range(len(SPECIAL), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def words(rng, n: int, vocab_size: int) -> str:
    return " ".join(f"t{int(i)}" for i in rng.integers(len(SPECIAL), vocab_size, n))


def synthetic_rows(n_train: int, n_eval: int, prompt_words: int, vocab_size: int, seed: int = 0):
    """Rows with a privileged context: a system rule and three demonstration turns (the
    same for every row, as a rule's demonstrations are), a regex verifier."""
    import numpy as np

    from opsd.data.rows import Row

    rng = np.random.default_rng(seed)
    demos = [{"prompt": words(rng, prompt_words // 2, vocab_size),
              "completion": words(rng, prompt_words, vocab_size)} for _ in range(3)]
    pi = {"system": words(rng, 32, vocab_size), "demonstrations": demos}
    verifier = {"type": "regex", "pattern": r"^\s*t1\d", "description": "start with t1x"}
    return [Row.model_validate({
        "id": f"q{i}", "prompt": words(rng, prompt_words, vocab_size), "privileged_context": pi,
        "verifier": verifier, "split": "train" if i < n_train else "eval", "task": "synthetic"})
        for i in range(n_train + n_eval)]


def build_model(shape: str, device: torch.device, folder: Path):
    """fp32 random-weight model on ``device`` (initialised there), its config and tokenizer
    saved in ``folder`` (small files: the stages read the config and tokenizer from there)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**SHAPES[shape], max_position_embeddings=4096, rope_theta=1e6,
                      rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg)
    model.eval()
    model.generation_config.eos_token_id = 1
    tok = synthetic_tokenizer(cfg.vocab_size)
    cfg.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok


# ------------------------------------------------------------------ FLOPs and bytes


@dataclass
class Shape:
    """What FLOP and byte counts need of a model."""

    params: int
    embed: int  # embedding parameters (the tied LM head)
    layers: int
    hidden: int
    vocab: int
    attn_dim: int  # heads × head_dim
    kv_dim: int  # kv heads × head_dim

    @classmethod
    def of(cls, model) -> "Shape":
        c = model.config
        return cls(sum(p.numel() for p in model.parameters()),
                   model.get_input_embeddings().weight.numel(), c.num_hidden_layers, c.hidden_size,
                   c.vocab_size, c.num_attention_heads * c.head_dim,
                   c.num_key_value_heads * c.head_dim)

    def forward_flops(self, seq_lens: list[int], head_tokens: int) -> float:
        """One forward pass over sequences of ``seq_lens`` (causal attention), the LM head on
        ``head_tokens`` positions: 2·N per token for the matmuls, 2·2·attn_dim per attended
        pair (scores and values) for each layer, 2·d·V per LM-head position."""
        tokens = sum(seq_lens)
        attended = sum(n * (n + 1) / 2 for n in seq_lens)
        return (2 * (self.params - self.embed) * tokens + 4 * self.layers * self.attn_dim * attended
                + 2 * self.hidden * self.vocab * head_tokens)

    def decode_bytes(self, batch: int, context: float, weight_bytes: int = 2) -> float:
        """Bytes one decode step must read: every weight once (bf16) and the KV cache of
        ``batch`` rows of ``context`` positions (bf16 keys and values, every layer)."""
        return self.params * weight_bytes + batch * context * self.layers * 2 * self.kv_dim * 2


# ------------------------------------------------------------------ measuring


@dataclass
class Result:
    model: str
    stage: str
    seconds: float
    tokens: int  # tokens the stage produced or processed (see `what`)
    what: str
    flops: float | None = None
    peak_gib: float | None = None
    extra: dict = field(default_factory=dict)

    def row(self, peak_tflops: float) -> dict:
        tps = self.tokens / self.seconds if self.seconds > 0 else None
        mfu = self.flops / self.seconds / (peak_tflops * 1e12) if self.flops and self.seconds else None
        return {"model": self.model, "stage": self.stage, "seconds": round(self.seconds, 4),
                "tokens": self.tokens, "tokens_are": self.what,
                "tokens_per_s": None if tps is None else round(tps, 1),
                "tflops": None if not self.flops else self.flops / self.seconds / 1e12,
                "mfu": mfu, "peak_memory_gib": self.peak_gib,
                **self.extra}


def timed(device, fn):
    """(result, seconds, peak GiB) of ``fn()`` on ``device``: synchronised, peak memory reset."""
    from opsd.device import MemoryWatch, synchronize

    synchronize(device)
    with MemoryWatch(device) as mem:
        t0 = time.perf_counter()
        out = fn()
        synchronize(device)
        dt = time.perf_counter() - t0
    return out, dt, mem.fields()["peak_memory_gib"]


def stage_ctx(root: Path, name: str, pool):
    from opsd.stages.common import StageContext

    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(out_dir=out, pool=pool, show_progress=False)


def bench_model(shape_name: str, args, device: torch.device, work: Path) -> list[Result]:
    from opsd.backends.hf import HFGenerator, HFScorer, SamplingParams
    from opsd.backends.prepack import refresh_from
    from opsd.config import ContextConfig, EvalConfig, RolloutConfig, TeacherConfig, TrainConfig
    from opsd.context.render import student_ids
    from opsd.policy import Policy
    from opsd.pool import ModelPool
    from opsd.stages import evaluate as evaluate_stage
    from opsd.stages import rollout as rollout_stage
    from opsd.stages import teacher as teacher_stage
    from opsd.stages import train as train_stage
    from opsd.stages.common import Artifact
    from opsd.storage.parquet import read_table
    from opsd.training.trainer import Trainer

    folder = work / shape_name
    folder.mkdir(parents=True, exist_ok=True)
    t_build = time.perf_counter()
    master, tok = build_model(shape_name, device, folder)
    shape = Shape.of(master)
    policy = Policy(f"bench-{shape_name}", folder, "student")
    pool = ModelPool(device=device)
    pool.adopt(policy, master)
    pool.tokenizers[str(folder)] = tok
    n_prompts = max(1, args.rollouts // args.n)
    rows = synthetic_rows(n_prompts, args.eval_rows, args.prompt_words, shape.vocab)
    train_rows = [r for r in rows if r.split == "train"]
    print(f"[{shape_name}] {shape.params / 1e9:.3f} B parameters built on {device} in "
          f"{time.perf_counter() - t_build:.1f} s", flush=True)
    dtype = args.dtype
    results: list[Result] = []

    def add(stage, seconds, tokens, what, flops=None, peak=None, **extra):
        r = Result(shape_name, stage, seconds, tokens, what, flops, peak, extra)
        results.append(r)
        row = r.row(args.peak_tflops)
        mfu = "-" if row["mfu"] is None else f"{row['mfu'] * 100:.2f} %"
        print(f"[{shape_name}] {stage}: {seconds:.2f} s, {row['tokens_per_s']} {what}/s, "
              f"MFU {mfu}, peak {peak} GiB {extra or ''}", flush=True)

    # --- warm-up: kernels, cuBLAS handles, the allocator (not timed)
    infer = pool.inference(policy, dtype)
    gen = HFGenerator(infer, tok, batch_size=args.rollout_batch)
    prompts = [student_ids(tok, r) for r in train_rows]
    gen.generate(prompts[:2], SamplingParams(n=1, max_new_tokens=4, seed=1))

    # --- 1. rollout stage
    rcfg = RolloutConfig(n=args.n, max_new_tokens=args.new_tokens, batch_size=args.rollout_batch,
                         dtype=dtype, temperature=1.0, seed=0)
    ctx = stage_ctx(work, f"{shape_name}-rollout", pool)
    man, dt, peak = timed(device, lambda: rollout_stage.run(rcfg, train_rows, policy, ctx))
    rollouts = Artifact("rollouts", ctx.out_dir, man)
    r = read_table(ctx.out_dir, columns=["prompt_ids", "response_ids"]).to_pydict()
    resp_tokens = sum(len(x) for x in r["response_ids"])
    prompt_len = statistics.mean(len(p) for p in r["prompt_ids"])
    # decode alone: a full generation minus a one-token one (same prompts and batches)
    params = SamplingParams(n=args.n, temperature=1.0, max_new_tokens=args.new_tokens, seed=0)
    _, t_full, _ = timed(device, lambda: gen.generate(prompts, params))
    one = SamplingParams(n=args.n, temperature=1.0, max_new_tokens=1, seed=0)
    _, t_one, _ = timed(device, lambda: gen.generate(prompts, one))
    batches = math.ceil(len(prompts) * args.n / args.rollout_batch)
    steps = max(1, args.new_tokens - 1)
    step_s = max(1e-9, (t_full - t_one) / (batches * steps))
    batch = min(args.rollout_batch, len(prompts) * args.n)
    floor_s = shape.decode_bytes(batch, prompt_len + args.new_tokens / 2) / (args.hbm_tbs * 1e12)
    decode_flops = shape.forward_flops([1] * batch, batch) * steps * batches  # matmuls only
    add("rollout", dt, resp_tokens, "generated tokens",
        flops=None, peak=peak, samples=man["samples"],
        decode_step_ms=round(step_s * 1e3, 3), hbm_floor_step_ms=round(floor_s * 1e3, 4),
        decode_of_hbm_floor=floor_s / step_s, decode_batch=batch,
        decode_mfu=decode_flops / (t_full - t_one) / (args.peak_tflops * 1e12)
        if t_full > t_one else None)

    # --- 2. teacher stage (prefill only)
    tcfg = TeacherConfig(topk=args.topk, batch_size=args.teacher_batch, dtype=dtype,
                         context=ContextConfig(views=["system", "demonstrations"]))
    ctx = stage_ctx(work, f"{shape_name}-teacher", pool)
    scorer = HFScorer(infer, batch_size=args.teacher_batch, share_prefix=tcfg.share_prefix)
    man, dt, peak = timed(device, lambda: teacher_stage.run(tcfg, rows, rollouts, policy, ctx,
                                                            scorer=scorer))
    targets = Artifact("targets", ctx.out_dir, man)
    st = scorer.stats
    # FLOPs of what the scorer computed: its positions (a shared prefix once) as one sequence
    # per scored row of the average length, the LM head on the response tokens
    n_rows = len(r["response_ids"])
    avg = st["tokens_computed"] / max(1, n_rows)
    tflops = shape.forward_flops([int(avg)] * n_rows, resp_tokens)
    add("teacher", dt, st["tokens_computed"], "positions encoded", flops=tflops, peak=peak,
        response_tokens=resp_tokens, tokens_total=st["tokens_total"])

    # --- 3. train stage (offline: the pool's master trains)
    trcfg = TrainConfig(objective="forward_kl_topk", epochs=args.epochs, batch_size=args.train_batch,
                        micro_batch_size=args.micro_batch, lr=1e-5, logit_chunk=args.logit_chunk,
                        save_every=0, seed=0, **json.loads(args.train_json))
    ctx = stage_ctx(work, f"{shape_name}-train", pool)
    del infer, gen, scorer  # train stage drops the inference copies: one fp32 model at the peak
    man, dt, peak = timed(device, lambda: train_stage.run(trcfg, rollouts, targets, policy, ctx,
                                                          rollout_temperature=1.0))
    hist = read_table(ctx.out_dir / "metrics.parquet").to_pylist()
    step_times = [h["seconds"] for h in hist]
    measured = step_times[1:] or step_times  # the first step warms kernels up
    step_s = statistics.median(measured)
    examples = train_stage.load_examples(rollouts, targets)
    per_step = args.train_batch
    seqs = [len(e.prompt_ids) + len(e.response_ids) for e in examples[:per_step]]
    head = sum(len(e.response_ids) for e in examples[:per_step])
    step_flops = 3 * shape.forward_flops(seqs, head)  # forward + backward (2x)
    trained = ctx.extras["trained_model"]
    add("train", step_s, sum(seqs), "positions per step", flops=step_flops, peak=peak,
        stage_seconds=round(dt, 2), steps=len(hist), step_seconds=[round(x, 4) for x in step_times],
        autocast=man.get("autocast"), activation_checkpointing=man.get("activation_checkpointing"),
        final_loss=round(hist[-1]["loss"], 5))
    for f in (ctx.out_dir / "model").glob("*.safetensors"):
        f.unlink()  # GBs of a random model's weights

    # --- 4. evaluate stage (greedy, the trained student)
    pool.adopt(policy, trained)
    pool.drop_copies(policy.key)
    ecfg = EvalConfig(max_new_tokens=args.eval_tokens, batch_size=args.rollout_batch, dtype=dtype,
                      teacher_ceiling=False)
    ctx = stage_ctx(work, f"{shape_name}-evaluate", pool)
    eval_rows = [r for r in rows if r.split == "eval"]
    man, dt, peak = timed(device, lambda: evaluate_stage.run(ecfg, eval_rows, policy, ctx,
                                                             label="after"))
    et = read_table(ctx.out_dir, columns=["n_tokens"]).to_pydict()
    add("evaluate", dt, int(sum(et["n_tokens"])), "generated tokens", peak=peak,
        rows=man["rows"])

    # --- 5. one online iteration: resident models, rollout -> teacher -> one optimiser step
    infer = pool.inference(policy, dtype)
    gen = HFGenerator(infer, tok, batch_size=args.rollout_batch)
    scorer = HFScorer(infer, batch_size=args.teacher_batch)
    ocfg = trcfg.model_copy(update={"batch_size": n_prompts * args.n})
    trainer = Trainer(trained, ocfg, tok.pad_token_id, total_steps=1)
    parts: dict[str, float] = {}
    peaks: list[float] = []

    def iteration():
        c = stage_ctx(work, f"{shape_name}-online-rollout", pool)
        _, parts["rollout"], p = timed(device, lambda: rollout_stage.run(
            rcfg.model_copy(update={"seed": 1}), train_rows, policy, c, iteration=1, engine=gen))
        peaks.append(p or 0.0)
        roll = Artifact("online-rollouts", c.out_dir)
        c = stage_ctx(work, f"{shape_name}-online-teacher", pool)
        _, parts["teacher"], p = timed(device, lambda: teacher_stage.run(tcfg, rows, roll, policy, c,
                                                                         scorer=scorer))
        peaks.append(p or 0.0)
        targ = Artifact("online-targets", c.out_dir)
        stats, parts["train_step"], p = timed(device, lambda: train_stage.online_steps(
            trainer, ocfg, roll, targ, 1, 1))
        peaks.append(p or 0.0)
        _, parts["refresh_copy"], _ = timed(device, lambda: refresh_from(infer, trained))
        return stats

    stats, dt, _ = timed(device, iteration)
    add("online iteration", dt, int(stats[0]["tokens"]), "response tokens trained",
        peak=max(peaks) if peaks else None,
        seconds_by_part={k: round(v, 3) for k, v in parts.items()},
        other_seconds=round(dt - sum(parts.values()), 3))
    del pool, trainer, trained, master, infer, gen, scorer
    from opsd.device import empty_cache

    empty_cache(device)
    return results


def table(rows: list[dict]) -> str:
    head = ("| model | stage | seconds | tokens/s | MFU | decode vs HBM floor | peak GiB |\n"
            "|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        floor = r.get("decode_of_hbm_floor")
        floor_s = (f"{floor * 100:.2f} % ({r['decode_step_ms']} ms/step vs "
                   f"{r['hbm_floor_step_ms']} ms, batch {r['decode_batch']})") if floor else "-"
        mfu = f"{r['mfu'] * 100:.2f} %" if r.get("mfu") is not None else "-"
        tps = f"{r['tokens_per_s']:.0f} {r['tokens_are']}" if r.get("tokens_per_s") else "-"
        lines.append(f"| {r['model']} | {r['stage']} | {r['seconds']:.3f} | {tps} | {mfu} | "
                     f"{floor_s} | {r['peak_memory_gib'] if r['peak_memory_gib'] is not None else '-'} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--models", default="qwen3-0.6b,qwen3-1.7b",
                    help=f"comma-separated shapes of {sorted(SHAPES)}")
    ap.add_argument("--tiny", action="store_true",
                    help="a 2-layer model and small sizes: a smoke run, not a benchmark")
    ap.add_argument("--rollouts", type=int, default=64, help="replies per rollout (prompts × n)")
    ap.add_argument("--n", type=int, default=2, help="samples per prompt")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-words", type=int, default=64)
    ap.add_argument("--rollout-batch", type=int, default=64)
    ap.add_argument("--teacher-batch", type=int, default=32)
    ap.add_argument("--topk", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--logit-chunk", type=int, default=1024)
    ap.add_argument("--eval-rows", type=int, default=64)
    ap.add_argument("--eval-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="auto", help="compute dtype of rollout/teacher/eval")
    ap.add_argument("--train-json", default="{}",
                    help='extra TrainConfig fields as JSON, e.g. \'{"compile": true}\'')
    ap.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS)
    ap.add_argument("--hbm-tbs", type=float, default=HBM_TBS)
    ap.add_argument("--out", type=Path, default=Path("bench/results/gpu_pipeline.json"))
    args = ap.parse_args(argv)
    if args.tiny:
        args.models = "tiny"
        args.rollouts, args.new_tokens, args.prompt_words = 8, 8, 8
        args.rollout_batch, args.teacher_batch, args.train_batch, args.micro_batch = 8, 4, 4, 2
        args.eval_rows, args.eval_tokens, args.logit_chunk, args.topk = 4, 4, 16, 4

    from opsd.device import auto_dtype, resolve_device

    device = resolve_device(args.device)
    choice = auto_dtype(device)
    if args.dtype == "auto":
        args.dtype = choice.dtype
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}); dtype {args.dtype} ({choice.reason}); torch "
          f"{torch.__version__}", flush=True)
    t0 = time.perf_counter()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="opsd-gpu-bench-") as tmp:
        for shape in args.models.split(","):
            results += bench_model(shape.strip(), args, device, Path(tmp))
    rows = [r.row(args.peak_tflops) for r in results]
    import transformers

    out = {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv),
           "peak_tflops": args.peak_tflops, "hbm_tbs": args.hbm_tbs, "dtype": args.dtype,
           "wall_seconds": round(time.perf_counter() - t0, 1),
           "settings": {k: v for k, v in vars(args).items() if k != "out"}, "results": rows}
    print(table(rows))
    print(f"total {out['wall_seconds']} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    main()
