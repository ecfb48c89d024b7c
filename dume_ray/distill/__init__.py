"""Distillation: KD losses (pure), the student worker and its driver."""
