"""Params and specs of the quantize methods (the implementations: workers/quantize/)."""
