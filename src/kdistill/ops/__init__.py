"""Tensor operations shared by models and losses (the lowest layer above torch)."""
