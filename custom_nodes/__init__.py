"""Packaging root: lets the repository root import the pack as `.custom_nodes.charforge`."""
