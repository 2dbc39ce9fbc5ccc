"""Cost of one training step per divergence on SmolLM2-135M (batch 4, T = 1024).

    python -m bench.bench_objectives                  # all divergences, one subprocess each
    python -m bench.bench_objectives --only jsd --seq-len 512

Setup: 4 sequences of ``T`` tokens = a real behaviours-suite chat prompt + a response
filling the rest (the model's own greedy-free random tokens are enough: cost does not
depend on the text); teacher targets (top-20 + tail) come from the real teacher (the
same model with three demonstration turns in context) via the teacher stage's scorer;
live-teacher objectives re-run that teacher during the step. One optimiser step
(forward, loss, backward, AdamW) with ``micro_batch_size = 4``, ``logit_chunk = 256``,
bf16 autocast, fp32 master weights.

Per divergence, in a fresh process:

- ``step_s`` / ``tok_s``: wall time of the second step and response tokens per second;
- ``peak_rss_mib``: the process's peak RSS during that step (VmHWM, reset before it);
  ``base_rss_mib`` the RSS before it (model, optimiser state, targets);
- vocabulary-sized activations, counted by a ``TorchDispatchMode`` that sees every tensor
  any op creates (forward, checkpoint recompute and backward) and tracks the live bytes
  of those whose last dimension is the vocabulary — ``peak_vocab_mib`` and
  ``peak_vocab_blocks`` = that peak / one ``[logit_chunk, V]`` float32 block — against a
  ``[B, T, V]`` float32 logits tensor (``full_logits_mib``), which the loop never builds.

A reference row ``naive`` runs the textbook step (``model(...).logits`` over the whole
sequence, log-softmax, top-k forward KL) for comparison. Prints a table and writes JSON
(default ``bench/results/objectives.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import weakref
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.docs import write_section  # noqa: E402

DIVERGENCES = {
    "forward_kl_topk": {"objective": "forward_kl_topk"},
    "reverse_kl_sampled": {"objective": "reverse_kl_sampled"},
    "reverse_kl_topk": {"objective": "reverse_kl_topk"},
    "reverse_kl_topk_student_live": {"objective": "reverse_kl_topk", "divergence": {"topk_support": "student"}},
    "jsd_live": {"objective": "jsd", "divergence": {"jsd_beta": 0.5}},
    "jsd_forward_clip_live": {"objective": "jsd", "divergence": {"jsd_beta": 0.0, "clip": 0.05}},
    "naive": None,  # textbook full-logits step, for reference
}


def _proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class VocabTracker:
    """Live bytes of vocabulary-sized tensors (last dim == V), by storage, while active."""

    def __init__(self, vocab: int):
        from torch.utils._python_dispatch import TorchDispatchMode

        self.vocab = vocab
        self.live: dict[int, list] = {}  # storage ptr -> [refs, bytes, is_fp32]
        self.cur = self.cur32 = 0
        self.peak = self.peak32 = 0
        self.count = 0
        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._see(out)
                return out

        self.mode = Mode()

    def _see(self, out) -> None:
        import torch
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.shape[-1] != self.vocab:
                continue
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr in self.live:
                self.live[ptr][0] += 1
            else:
                fp32 = t.dtype == torch.float32
                self.live[ptr] = [1, st.nbytes(), fp32]
                self.cur += st.nbytes()
                self.cur32 += st.nbytes() if fp32 else 0
                self.count += 1
                self.peak = max(self.peak, self.cur)
                self.peak32 = max(self.peak32, self.cur32)
            weakref.finalize(t, self._release, ptr)

    def _release(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] <= 0:
            self.cur -= entry[1]
            self.cur32 -= entry[1] if entry[2] else 0
            del self.live[ptr]

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def build_examples(model_path: Path, batch: int, seq_len: int, topk: int):
    """``batch`` examples of ``seq_len`` tokens with real teacher targets and contexts."""
    import numpy as np
    import torch

    from opsd.backends.hf import HFScorer
    from opsd.config import ContextConfig
    from opsd.context.render import build_context, student_ids, student_turn_ids, teacher_ids
    from opsd.data import load_rows
    from opsd.models import load_model, load_tokenizer
    from opsd.training.batches import Example

    tok = load_tokenizer(model_path)
    rows = [r for r in load_rows("behaviours:sure-thing") if r.split == "train"][:batch]
    g = torch.Generator().manual_seed(0)
    prompts = [student_ids(tok, r) for r in rows]
    contexts = [teacher_ids(tok, r, build_context(r, ContextConfig()), student_turn_ids(tok, r)) for r in rows]
    vocab = len(tok)
    responses = [torch.randint(200, vocab - 1, (seq_len - len(p),), generator=g).tolist() for p in prompts]
    teacher = load_model(model_path, torch.bfloat16)
    targets = HFScorer(teacher, batch_size=batch).score(contexts, responses, topk)
    del teacher
    out = []
    for i, (p, r, t) in enumerate(zip(prompts, responses, targets)):
        out.append(Example(
            sample_id=f"b{i}", prompt_ids=p, response_ids=r,
            behaviour_logp=t.sampled_logprob_R.float().numpy() - 0.1,
            teacher_logp=t.sampled_logprob_R.float().numpy(),
            topk_ids=t.topk_ids_RK.numpy().astype(np.int32), topk_logp=t.topk_logprobs_RK.float().numpy(),
            tail=t.tail_mass_R.float().numpy(), reward=float(i % 2), group="g", passed=bool(i % 2),
            teacher_context_ids=contexts[i],
        ))
    return out, vocab


def naive_step(model, examples, opt, pad_id: int):
    """Textbook step: the model's full ``[B, L, V]`` logits, log-softmax, top-k forward KL."""
    import torch

    from opsd.objectives import divergences as D
    from opsd.training.batches import collate

    b = collate(examples, pad_id)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits_BLV = model(input_ids=b.input_ids_BL).logits
    logp_BLV = logits_BLV.float().log_softmax(-1)
    logp_NV = logp_BLV[b.row_idx_N, b.pos_idx_N]
    loss_N, _ = D.forward_kl_topk(logp_NV, b.topk_ids_NK, b.topk_logp_NK, b.tail_N)
    loss = loss_N.mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)


def run_one(name: str, args) -> dict:
    import copy

    import torch

    from opsd.config import TrainConfig
    from opsd.models import load_model, load_tokenizer, resolve_model_path
    from opsd.training.trainer import Trainer

    torch.manual_seed(0)
    path = resolve_model_path(args.model)
    examples, vocab = build_examples(path, args.batch, args.seq_len, args.topk)
    tok = load_tokenizer(path)
    model = load_model(path, torch.float32)
    model.train()
    spec = DIVERGENCES[name]
    n_tokens = sum(len(e.response_ids) for e in examples)
    if spec is None:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
        step = lambda: naive_step(model, examples, opt, tok.pad_token_id)  # noqa: E731
    else:
        cfg = TrainConfig.model_validate({**spec, "batch_size": args.batch, "micro_batch_size": args.batch,
                                          "logit_chunk": args.logit_chunk, "lr": 1e-6})
        teacher = copy.deepcopy(model).to(torch.bfloat16).eval() if cfg.live_teacher else None
        trainer = Trainer(model, cfg, tok.pad_token_id, total_steps=10, teacher_model=teacher,
                          teacher_batch_size=args.batch)
        step = lambda: trainer.step(examples).loss  # noqa: E731
    # step 1: memory accounting of vocabulary-sized tensors (also warms up)
    tracker = VocabTracker(vocab)
    with tracker:
        loss1 = step()
    # step 2: timing and peak RSS
    base_rss = _proc_kib("VmRSS")
    reset = _reset_peak_rss()
    t0 = time.perf_counter()
    loss2 = step()
    dt = time.perf_counter() - t0
    peak = _proc_kib("VmHWM")
    block = args.logit_chunk * vocab * 4
    return {
        "divergence": name, "config": spec, "batch": args.batch, "seq_len": args.seq_len,
        "response_tokens": n_tokens, "vocab": vocab, "logit_chunk": args.logit_chunk,
        "step_s": dt, "tok_s": n_tokens / dt, "loss_step1": loss1, "loss_step2": loss2,
        "base_rss_mib": base_rss / 1024, "peak_rss_mib": peak / 1024, "peak_rss_reset": reset,
        "peak_vocab_mib": tracker.peak / 2**20, "peak_vocab_blocks": tracker.peak / block,
        "peak_fp32_vocab_blocks": tracker.peak32 / block,
        "vocab_tensors_created": tracker.count,
        "chunk_block_mib": block / 2**20,
        "full_logits_mib": args.batch * args.seq_len * vocab * 4 / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--topk", type=int, default=20)
    ap.add_argument("--logit-chunk", type=int, default=256)
    ap.add_argument("--only", nargs="*", choices=list(DIVERGENCES))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "objectives.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--docs", default=str(ROOT / "docs" / "recipes.md"),
                    help="markdown file whose objectives:bench section is rewritten")
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--docs-from", help="only render --docs from an existing results JSON")
    args = ap.parse_args()
    if args.docs_from:
        write_section(Path(args.docs), "objectives:bench", markdown(json.loads(Path(args.docs_from).read_text())),
                      "Training step cost per divergence")
        print(f"wrote {args.docs}")
        return
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args)), flush=True)
        return
    names = args.only or list(DIVERGENCES)
    results = []
    for name in names:
        cmd = [sys.executable, "-m", "bench.bench_objectives", "--one", name, "--model", args.model,
               "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--topk", str(args.topk),
               "--logit-chunk", str(args.logit_chunk)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            res = {"divergence": name, "error": (proc.stderr or proc.stdout)[-2000:]}
        else:
            res = json.loads(line[len("RESULT "):])
        res["process_s"] = time.perf_counter() - t0
        results.append(res)
        print(_row(res), flush=True)
    meta = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "command": " ".join(["python -m bench.bench_objectives"] + sys.argv[1:])}
    try:
        import torch

        meta["torch"] = torch.__version__
        meta["threads"] = torch.get_num_threads()
    except ImportError:
        pass
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\nwrote {out}")
    if not args.no_docs:
        write_section(Path(args.docs), "objectives:bench", markdown({"meta": meta, "results": results}),
                      "Training step cost per divergence")
        print(f"wrote {args.docs}")




def markdown(data: dict) -> str:
    meta, rows = data["meta"], data["results"]
    ok = [r for r in rows if "error" not in r]
    first = ok[0] if ok else {}
    lines = [
        f"One optimiser step on SmolLM2-135M-Instruct, batch {first.get('batch', '?')} × T = "
        f"{first.get('seq_len', '?')} ({first.get('response_tokens', '?')} response tokens), "
        f"`logit_chunk` {first.get('logit_chunk', '?')}, bf16 autocast, fp32 AdamW; "
        f"{meta.get('cpus')} CPU cores, torch {meta.get('torch', '?')}; command: `{meta['command']}`. "
        f"`[C,V] blocks`: peak live bytes of vocabulary-sized tensors during the step (forward, "
        f"checkpoint recompute and backward, teacher included) in units of one fp32 "
        f"`[logit_chunk, V]` block ({first.get('chunk_block_mib', 0):.0f} MiB); a full fp32 "
        f"`[B, T, V]` logits tensor would be {first.get('full_logits_mib', 0):.0f} MiB.",
        "",
        "| divergence | step s | tokens/s | RSS before step | peak RSS in step | peak vocab-sized MiB | "
        "`[C,V]` blocks | of which fp32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['divergence']} | failed: {r['error'].strip().splitlines()[-1][:80]} | | | | | | |")
            continue
        lines.append(f"| {r['divergence']} | {r['step_s']:.1f} | {r['tok_s']:.0f} | {r['base_rss_mib']:.0f} MiB | "
                     f"{r['peak_rss_mib']:.0f} MiB | {r['peak_vocab_mib']:.0f} | {r['peak_vocab_blocks']:.2f} | "
                     f"{r.get('peak_fp32_vocab_blocks', float('nan')):.2f} |")
    return "\n".join(lines)


HEADER = (f"{'divergence':<30} {'step s':>7} {'tok/s':>7} {'base RSS':>9} {'peak RSS':>9} "
          f"{'vocab MiB':>10} {'[C,V] blocks':>12} {'fp32':>5} {'[B,T,V] MiB':>11}")


def _row(r: dict) -> str:
    if not hasattr(_row, "printed"):
        print(HEADER)
        _row.printed = True
    if "error" in r:
        return f"{r['divergence']:<30} FAILED: {r['error'].splitlines()[-1] if r['error'] else '?'}"
    return (f"{r['divergence']:<30} {r['step_s']:7.1f} {r['tok_s']:7.0f} {r['base_rss_mib']:8.0f}M "
            f"{r['peak_rss_mib']:8.0f}M {r['peak_vocab_mib']:10.0f} {r['peak_vocab_blocks']:12.2f} "
            f"{r.get('peak_fp32_vocab_blocks', float('nan')):5.2f} {r['full_logits_mib']:11.0f}")


if __name__ == "__main__":
    main()
