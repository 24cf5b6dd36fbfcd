"""Signed webhooks: per-tenant signing secret, job event deliveries and their log."""
