"""Parquet schemas of the stage outputs, and atomic shard writers.

Token ids are stored exactly as sampled (int32 lists), never as re-tokenised
text. Per-token teacher targets are nested lists ``[R][k]`` so DuckDB can index
them (``topk_ids[pos][1]``); top-k log-probs are float16 — the training signal
needs ~3 significant digits and this halves the largest column.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

I32 = pa.int32()
F32 = pa.float32()

ROLLOUTS = pa.schema(
    [
        ("sample_id", pa.string()),
        ("row_id", pa.string()),
        ("sample_idx", I32),
        ("task", pa.string()),
        ("prompt_ids", pa.list_(I32)),
        ("response_ids", pa.list_(I32)),
        ("behaviour_logprobs", pa.list_(F32)),
        ("text", pa.string()),
        ("finish_reason", pa.string()),
        ("reward", F32),
        ("passed", pa.bool_()),
        ("feedback", pa.string()),
        ("n_tokens", I32),
        ("policy", pa.string()),
        ("iteration", I32),
        ("guided_positions", pa.list_(I32)),
    ],
    metadata={"opsd.kind": "rollouts"},
)

TEACHER = pa.schema(
    [
        ("sample_id", pa.string()),
        ("row_id", pa.string()),
        ("context_len", I32),
        ("context_hash", pa.string()),
        ("response_hash", pa.string()),
        ("n_tokens", I32),
        ("sampled_logprobs", pa.list_(F32)),
        ("topk_ids", pa.list_(pa.list_(I32))),
        ("topk_logprobs", pa.list_(pa.list_(pa.float16()))),
        ("tail_mass", pa.list_(F32)),
        ("views", pa.string()),
        ("teacher", pa.string()),
        ("rollout_key", pa.string()),
    ],
    metadata={"opsd.kind": "teacher"},
)
# MOPD's routed teacher targets: the same columns plus the name of the teacher that scored the row
ROUTED_TEACHER = pa.schema([*TEACHER, pa.field("teacher_name", pa.string())],
                           metadata={"opsd.kind": "teacher"})

# The teacher's prompt ids (privileged context + the student's turns), once per distinct
# context: live-teacher objectives re-run the teacher on them during training.
# G-OPD's reference model: its log-prob of every sampled token on the student's prompt
REFERENCE_FILE = "reference.parquet"
REFERENCE = pa.schema([("sample_id", pa.string()), ("reference_logprobs", pa.list_(pa.float32()))])
# CEPO's wrong-answer teacher: the log-prob of every sampled token with a rejected sibling's
# reply in place of the ground truth, the sibling it came from (null: none, scored with the
# sample's own context) and the contrast log pT+ - log pT- per token
NEGATIVE_FILE = "negative.parquet"
NEGATIVE = pa.schema([("sample_id", pa.string()), ("rejected_from", pa.string()),
                      ("negative_logprobs", pa.list_(F32)), ("contrast", pa.list_(F32))],
                     metadata={"opsd.kind": "teacher_negative"})
# BRTS: one row per prompt of a rollout shard, in a file beside the shard (selection-NNNNN):
# which teacher reply was kept as a training sample and why. candidates: every sampled teacher
# reply (tier 1: the teacher's context, tier 2: the recovery step's) with its verdict and the
# student's mean per-token log-likelihood of it
SELECTION = pa.schema(
    [
        ("row_id", pa.string()),
        ("sample_id", pa.string()),  # the stored teacher sample; null when none was kept
        ("tier", pa.int8()),  # 1 passing, 2 passing after recovery, 3 fallback, 0 none kept
        ("chosen", I32),  # index into candidates (null: none kept)
        ("reason", pa.string()),
        ("candidates", pa.list_(pa.struct([("tier", pa.int8()), ("passed", pa.bool_()),
                                           ("student_logp", F32), ("n_tokens", I32),
                                           ("text", pa.string())]))),
    ],
    metadata={"opsd.kind": "brts_selection"},
)
CONTEXTS_FILE = "contexts.parquet"
CONTEXTS = pa.schema(
    [
        ("context_hash", pa.string()),
        ("context_ids", pa.list_(I32)),
    ],
    metadata={"opsd.kind": "teacher_contexts"},
)

EVAL_SAMPLES = pa.schema(
    [
        ("policy", pa.string()),
        ("row_id", pa.string()),
        ("task", pa.string()),
        ("sample_idx", I32),
        ("greedy", pa.bool_()),
        ("text", pa.string()),
        ("response_ids", pa.list_(I32)),
        ("finish_reason", pa.string()),
        ("passed", pa.bool_()),
        ("reward", F32),
        ("n_tokens", I32),
    ],
    metadata={"opsd.kind": "eval"},
)

TRAIN_METRICS = pa.schema(
    [
        ("step", I32),
        ("epoch", I32),
        ("loss", F32),
        ("kl", F32),
        ("entropy", F32),
        ("grad_norm", F32),
        ("lr", F32),
        ("tokens", I32),
        ("tokens_per_s", F32),
        ("seconds", F32),
        ("div_min", F32),
        ("div_max", F32),
        # SD-Zero's reviser term (train.reviser): mean NLL per token of the step's passing
        # revisions and how many tokens it had; null when the run trains no reviser
        ("reviser_loss", F32),
        ("reviser_tokens", I32),
    ],
    metadata={"opsd.kind": "train_metrics"},
)

# SD-Zero's revise stage: the current model, reading the reviser context (the teacher prompt with
# the attempt view), rewrites an iteration's attempts; one row per revision
REVISIONS = pa.schema(
    [
        ("sample_id", pa.string()),  # "<attempt sample_id>~r<j>"
        ("attempt_id", pa.string()),  # the rollout it revises
        ("row_id", pa.string()),
        ("task", pa.string()),
        ("prompt_ids", pa.list_(I32)),  # the reviser context: teacher prompt with the attempt
        ("response_ids", pa.list_(I32)),
        ("behaviour_logprobs", pa.list_(F32)),
        ("text", pa.string()),
        ("finish_reason", pa.string()),
        ("reward", F32),
        ("passed", pa.bool_()),
        ("feedback", pa.string()),
        ("n_tokens", I32),
        ("attempt_passed", pa.bool_()),
        ("attempt_reward", F32),
        ("policy", pa.string()),
        ("iteration", I32),
    ],
    metadata={"opsd.kind": "revisions"},
)


def write_table_atomic(table: pa.Table, path: Path) -> int:
    """Write ``table`` to ``path`` via a temp name + rename; returns bytes written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd", compression_level=3)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path.stat().st_size


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def completed_shards(folder: Path) -> dict[int, Path]:
    """Shards already whole in a staging dir (a crash leaves only ``.tmp`` files)."""
    out = {}
    if folder.exists():
        for f in folder.glob("part-*.parquet"):
            out[int(f.stem.split("-")[1])] = f
    return out


def read_table(folder_or_file: Path, columns: list[str] | None = None) -> pa.Table:
    if folder_or_file.is_dir():
        files = sorted(folder_or_file.glob("part-*.parquet"))
        if not files:
            raise FileNotFoundError(f"no Parquet shards in {folder_or_file}")
        return pa.concat_tables(pq.read_table(f, columns=columns) for f in files)
    return pq.read_table(folder_or_file, columns=columns)
