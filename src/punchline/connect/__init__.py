"""The connectivity engine: candidates, connectivity checks and the path ladder (RFC 8445 model)."""
