"""Relay nodes: TURN (RFC 8656) for media that has no direct path, forwarding ciphertext only."""
