"""Stateless codecs and constants of every punchline wire format."""
