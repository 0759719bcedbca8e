"""kdistill: knowledge distillation for PyTorch."""
