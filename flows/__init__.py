"""Prefect flows (thin): they chain stages; opsd.pipeline decides reuse."""

from opsd.env import apply_defaults

apply_defaults()
