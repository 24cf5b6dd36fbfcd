"""Params and specs of the distill methods (the implementations: workers/distill/)."""
