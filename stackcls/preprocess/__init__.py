"""Stacks -> arrays: what a network sees of a slice.

    arrays.py    windowing, the paper's centre crop and resize, splits and folds, oversampling
    augment.py   random rotations (the paper's augmentation), as one jitted function
    beyond.py    real stacks extended past the apex and the base, for training (method=anatomy)
    physical.py  every slice at 1.5 mm per pixel, cut around the heart (method=anatomy)

Imports only the top level (stack, progress); every wing above reads its arrays from here.
"""
