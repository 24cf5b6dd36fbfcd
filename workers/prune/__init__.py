"""Pruning methods, one module per method, with their algorithms in prune.algorithms (torch).

Methods: channels (prune.channels), magnitude (prune.magnitude), two_four (prune.2_4); common holds what they
share (params, ONNX -> torch and back, fine-tuning). algorithms: channel surgery, magnitude masks, 2:4 patterns,
fine-tuning loops.
"""
