"""Lowering of rewritten graphs and compressed modules.

The rewritten graph and the compressed module run as they are in eager PyTorch (CPU or GPU), and
either can be handed to torch.compile (Inductor). Triton kernels, ONNX and TensorRT export are
added here as they are built (see kernels/ and the project's issues).
"""
