"""asyncio adapters that move bytes between sockets and the sans-I/O cores."""
