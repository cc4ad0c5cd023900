"""Outputs that consume flow and message events."""
