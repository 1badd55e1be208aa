"""Sequence and language-model distillation."""
