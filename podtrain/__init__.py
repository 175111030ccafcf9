"""podtrain: dense and mixture-of-experts transformer training from a laptop CPU to TPU and GPU pods.

The rooms are sub-packages whose folders sit at the repository root (pyproject.toml maps them):
podtrain.model, .parallel, .data, .train, .inference, .interop, .plan, .launch
(docs/architecture.md draws them).
"""

import importlib.metadata

try:
    __version__ = importlib.metadata.version("podtrain")
except importlib.metadata.PackageNotFoundError:  # run from a checkout that is not installed
    __version__ = "0+unknown"
