"""Supernodes: attach clients, answer STUN, keep presence in the global index, route signaling."""
