"""Prefect flows of lowgrad."""
