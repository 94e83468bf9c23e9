"""The global index of who is online, shared by all supernodes."""
