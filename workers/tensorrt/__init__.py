"""The TensorRT target: engines built from an ONNX or QDQ model for the GPU they run on (workers.tensorrt.engine),
run through TensorRT's own execution context behind the interface the measurement harness drives
(workers.tensorrt.session). Everything imports tensorrt and torch lazily: without them this package still
plans, names and refuses with stable codes."""
