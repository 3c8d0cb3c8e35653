"""Logs, metrics and the service manager's notifications."""
