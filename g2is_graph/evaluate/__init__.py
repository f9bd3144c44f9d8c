"""Evaluation of adapters on held-out test items (answer loss, choice accuracy)."""
