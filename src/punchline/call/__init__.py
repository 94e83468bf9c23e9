"""Calls between users: signaling state machine and the call report."""
