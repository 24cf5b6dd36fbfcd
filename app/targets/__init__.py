"""Targets: the runtime and device a job's result is built for and measured on (app.targets.schemas), and the
workers that can serve each one (registered in the database when they start)."""
