"""Checkpoint -> one self-contained ONNX file (fp32, int8 for CPU, fp16 for CUDA), verified against PyTorch."""
