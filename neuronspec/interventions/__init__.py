"""Interventions on a model's sites: ablation, integrated gradients, causal sweeps.

Every intervention patches a site through the model's site adapter
(:mod:`neuronspec.models.adapters`); none reaches into hook internals itself.
"""
