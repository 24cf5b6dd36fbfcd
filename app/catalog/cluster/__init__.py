"""Params and specs of the cluster methods (the implementations: workers/cluster/)."""
