"""NAT traversal helpers on our side of the wire: answering STUN Binding requests so clients
learn their reflexive address, with the RFC 5780 behaviour tests (`stun_server`,
`stun_service`), and classifying NAT mapping, filtering, port allocation, hairpinning and
mapping lifetime (`discovery`, sans-I/O; `discover`, its asyncio runner and the daemon's
monitor; `netcheck`, the reachability report)."""
