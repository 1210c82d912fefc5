"""Capture: hooks on model sites, streamed neuron statistics, and their disk cache."""
