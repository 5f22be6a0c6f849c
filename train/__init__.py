"""edlight training side: data folders, the student-work generator, presets, the training loop, evaluation.

Importing this package imports nothing heavy: `train.data`, `train.synth` and `train.data_cli` need only
numpy and Pillow, so `edlight data ...` works on an engine-only install. The modules that fine-tune or
evaluate a model (presets, loop, evaluate) import torch and transformers themselves.
"""
