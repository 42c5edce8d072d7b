"""Autointerpretability: explainers that label features and scorers that measure the labels on held-out examples."""
