"""This repository's specs use only the finding fixtures the plugin ships
(:mod:`neuronspec.fixtures`: ``dead``, ``ngram``, ``positional``, ``delta_sensitive``,
``hidden_attention``, ``ablation``, ``causal``, ``knowledge_neurons``, ``comparison``, …), as
any opted-in project does."""
