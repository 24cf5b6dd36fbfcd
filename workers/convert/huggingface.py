"""Hugging Face transformers folders (format "hf-zip") -> ONNX. Filled in below."""
from __future__ import annotations
