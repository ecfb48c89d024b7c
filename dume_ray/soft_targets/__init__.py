"""Soft targets: the TeacherScorer (pure) and its Ray Data driver."""
