"""How much a greedy pass rate moves with the same weights: numerical precision and batching.

    python -m bench.eval_noise [--source general] [--batch-sizes 1 8 48] [--max-new-tokens 96]

A retention figure is a difference of two greedy pass rates; on a small model a reply can flip
on rounding alone (bf16 matmuls, and the padding a batch adds change the logits in their last
bits, and greedy decoding follows whichever token wins). This evaluates the built-in model on an
eval set (default the ``general`` panel) in fp32 and bf16 at each batch size (HF ``generate``,
greedy, left-padded batches) and prints each pass rate and on how many questions its verdicts
differ from fp32 at batch 1 — the resolution a before/after delta on that set can have.
"""

from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="general", help="a data source; its eval rows are used")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 48])
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.machine import warn_if_busy
    from opsd.context.render import student_ids
    from opsd.data import load_rows, verify
    from opsd.models import resolve_model_path

    warn_if_busy()
    path = resolve_model_path(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    rows = [r for r in load_rows(args.source) if r.split == "eval" and r.verifier is not None]

    prompts = [student_ids(tok, r) for r in rows]  # the prompts opsd's evaluate stage renders
    verdicts: dict[tuple[str, int], list[bool]] = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        for bs in args.batch_sizes:
            t0, ok = time.perf_counter(), []
            for i in range(0, len(prompts), bs):
                enc = tok.pad({"input_ids": prompts[i:i + bs]}, return_tensors="pt")
                with torch.no_grad():
                    out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                                         pad_token_id=tok.pad_token_id)
                for row, ids in zip(rows[i:i + bs], out[:, enc.input_ids.shape[1]:]):
                    ok.append(verify(row.verifier, tok.decode(ids, skip_special_tokens=True), row).passed)
            key = (str(dtype).removeprefix("torch."), bs)
            verdicts[key] = ok
            ref = next(iter(verdicts.values()))
            flips = sum(a != b for a, b in zip(ref, ok))
            print(f"{key[0]:9s} batch {bs:3d}: {sum(ok)}/{len(ok)} = {sum(ok) / len(ok):6.1%}, "
                  f"{flips} verdicts differ from the first row ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    return {f"{d}/{b}": sum(v) / len(v) for (d, b), v in verdicts.items()}


if __name__ == "__main__":
    main()
