"""The model: backbones, fusion, checkpoints, explanations, ONNX export, the inference pipeline."""
