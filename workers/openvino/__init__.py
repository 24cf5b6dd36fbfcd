"""The OpenVINO target: lowering an ONNX model to OpenVINO IR at a precision (f32, bf16, NNCF int8) and running
it behind the interface the measurement harness drives (workers.openvino.session.OpenVINOSession)."""
