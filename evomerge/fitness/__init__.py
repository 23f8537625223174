"""Fitness: score live models on lm-eval item subsets, and estimate full-task accuracy with IRT."""
