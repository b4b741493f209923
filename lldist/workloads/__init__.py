"""What is evaluated: models, checkpoints and datasets.

`models`: the registry (mlp, cnn, cnn_skip, torchvision, python:module:function), checkpoints,
pretrained weights. `data`: digits, CIFAR-10, ImageFolder, the user's own, as tensors ready
for evaluation. `hf`: HuggingFace models and text data (the only transformers user).
`synthetic`: fixed-cost models for the benchmarks and tests.
"""
