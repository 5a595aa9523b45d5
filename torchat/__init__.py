"""torchat: PyTorch-native LLM inference, shaped as a build system."""

__version__ = "0.1.0"
