"""Keys and certificates: who a user or node is, verifiable offline against the CA."""
