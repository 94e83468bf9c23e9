"""The STUN answer a `upnp` router gives its own miniupnpd (`python -m punchline.lab.igd`).

Why: miniupnpd will not map ports while its WAN address is in a reserved range, and the lab's
"Internet" is TEST-NET-3. With `ext_perform_stun=yes` it instead asks a STUN server for its
public address, and maps when four Binding requests (plain, and asking for a changed address,
port, or both) all come back showing the address unchanged: no NAT or filter in front. This
responder runs in the router's namespace on its WAN address and answers each Binding request
from the socket it came in on with the source address it saw, ignoring CHANGE-REQUEST — true
for the lab, whose routers sit straight on the Internet bridge. (The supernodes' responder,
`nat.stun_server`, rightly refuses CHANGE-REQUEST it cannot honour; that would make miniupnpd
conclude it is behind a filtering NAT.)

Prints {"ready": true} once bound; anything that is not a Binding request is dropped.
"""

from __future__ import annotations

import argparse
import json
import socket

from punchline.errors import PunchlineError
from punchline.wire.stun import Class, Method, binding_success, decode_untrusted


def answer(data: bytes, source: tuple[str, int]) -> bytes | None:
    """The Binding success response to `data` from `source`, or None to drop it."""
    try:
        message = decode_untrusted(data)
    except PunchlineError:
        return None
    if message.method != Method.BINDING or message.cls != Class.REQUEST:
        return None
    return binding_success(message.transaction_id, source, software=None)


def serve(address: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((address, port))
        print(json.dumps({"ready": True}), flush=True)
        while True:
            data, source = sock.recvfrom(2048)
            reply = answer(data, source)
            if reply is not None:
                sock.sendto(reply, source)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="the router's WAN address")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    serve(args.listen, args.port)


if __name__ == "__main__":
    main()
