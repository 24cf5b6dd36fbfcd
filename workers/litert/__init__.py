"""The LiteRT (TFLite) target, for mobile: an ONNX model exported to a .tflite file through onnx2tf and
TensorFlow's converter at f32, f16 (weights) or full-integer int8 (calibrated on the job's samples), and run by
LiteRT's CPU interpreter (ai-edge-litert) behind the interface the measurement harness drives
(workers.litert.session.LiteRTSession)."""
