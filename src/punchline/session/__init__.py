"""Authenticated, encrypted sessions: client ↔ supernode and supernode ↔ supernode."""
