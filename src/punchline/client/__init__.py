"""The user's side: identity store, login-server client, and (later) the daemon."""
