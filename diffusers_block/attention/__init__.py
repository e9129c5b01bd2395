"""Filled by later issues (see the repository issues)."""
