"""Regression gates: a candidate model measured against a baseline under a policy (pass or fail), run as jobs of
kind "gate" (workers/gate.py)."""
