"""Params and specs of the prune methods (the implementations: workers/prune/)."""
