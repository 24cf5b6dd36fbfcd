"""ONNX helpers shared by the methods, the intake checks and the measurement; none of them measures anything.

- inputs: the inputs a model is fed (plan_inputs: shapes, dtypes and generated values), the preflight run
- graph: every subgraph of a graph (graphs), stored tensor sizes (model_size)
- counting: parameters and multiply-accumulates counted from the graph (count)
- similarity: cosine of two outputs
"""
