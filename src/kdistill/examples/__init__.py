"""Worked examples that ship with kdistill: models given by import path, data written as PNGs.

- `kdistill.examples.my_models`: a teacher and a student as *your* code would define them
  (their own constructor arguments, not in kdistill's registry);
- `python -m kdistill.examples.fashion_mnist_pngs <folder>`: writes real Fashion-MNIST test
  images as an image folder (`train/` and `test/`, one sub-folder per class).

The recipe `own_models_imagefolder` puts them together.
"""
