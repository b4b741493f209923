"""What is evaluated: models, checkpoints and data sets. Imports only config and errors.

  models.py     the registry (mlp, cnn, cnn_skip, mobilenet_v2, torchvision:, hf:, python:),
                checkpoints, pretrained weights
  data.py       digits, CIFAR-10, ImageFolder, the user's own, decoded once into tensors
  tensors.py    the containers a split lives in: TensorSet, DictSet, BatchList
  hf.py         HuggingFace models and text data (transformers, datasets: the lldist[hf] extra)
  factory.py    python:<module>:<name> references, imported
  synthetic.py  fixed-cost models for the benchmarks and tests
  notes.py      what loading says, on rank 0 only
"""
