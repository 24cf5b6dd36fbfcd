"""Integrations with the platforms around ModelPress: each tenant's MLflow tracking server (settings, the pull of
a registered model, the checks a job that logs to it passes at submit)."""
