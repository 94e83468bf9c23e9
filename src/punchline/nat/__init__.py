"""NAT traversal helpers on our side of the wire: answering STUN Binding requests so clients
learn their reflexive address, and (later) classifying NAT mapping and filtering behaviour
(RFC 4787, RFC 5780). Everything here is sans-I/O: bytes in, bytes out."""
