"""Flax NNX models: one file per component, its PyTorch weight mapping in the *_mapping.py beside it."""
