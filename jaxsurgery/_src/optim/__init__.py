"""Optimizer state across a surgery: per-element Adam counts, local warm-up, moment operators."""
