"""Evaluation: report building (pure) and the eval stage driver."""
