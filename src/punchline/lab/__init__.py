"""Whole punchline networks on one machine: for the demo, the tests and operators' trials."""
