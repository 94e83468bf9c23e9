"""Key agreement and packet protection between certified identities.

Everything here is built from `cryptography`'s primitives (X25519, Ed25519, HKDF-SHA256,
ChaCha20-Poly1305); nothing is hand-rolled. `handshake` turns two certificates and two messages
into fresh per-direction keys; `packets` uses those keys to seal datagrams with replay
protection. Like the wire codecs, these modules do no I/O and take time and randomness as
arguments, so every run can be repeated in a test.
"""
