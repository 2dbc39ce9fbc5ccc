"""A model identity: where its weights are and the content key of what they compute.

Its own module (no dependencies) so that the config's teacher-kind table and the stages can name
policies without importing the model pool.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Policy:
    """A model identity used by stages: where its weights are and its content key."""

    key: str  # fingerprint of the weights (base model) or the train artifact key
    path: Path
    label: str = ""  # human name: "base", "iter-3", "teacher"
