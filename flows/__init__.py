"""Prefect flows (thin): they chain stages; opsd.flows.runner decides reuse."""

from opsd.env import apply_defaults

apply_defaults()
