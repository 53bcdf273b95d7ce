"""Lowering of rewritten graphs and compressed modules.

The rewritten graph and the compressed module run as they are in eager PyTorch (CPU or GPU, the
tngraph ops calling the Triton kernels of tngraph/kernels/ on CUDA), and either can be handed to
torch.compile (Inductor; tngraph.backend is the torch.compile backend). onnx.py exports ONNX files
checked in onnxruntime; tensorrt.py builds TensorRT engines from them.
"""
