"""Pytest fixtures for tiny models (session-scoped, built once per test run)."""
