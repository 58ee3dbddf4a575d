"""onnx_ir helpers shared by the graph passes: safe load/save, adapter sites, slots, contract."""
