"""AEAD protection of datagrams with a sliding anti-replay window.

Why: media and session datagrams travel over UDP through relays we do not trust, so each one is
sealed with ChaCha20-Poly1305 (RFC 8439) under the per-direction keys of a handshake
(`crypto.handshake.SessionKeys`). The construction follows SRTP's AEAD mode (RFC 7714 §8-9)
with ChaCha20-Poly1305 in place of AES-GCM: the 96-bit nonce is the packet index, so it is
never reused as long as a sender's indexes strictly increase (enforced here), and the
receiver keeps the sliding bitmap replay window of RFC 3711 §3.3.2. The window moves only
after a packet authenticates, so forged packets with huge indexes cannot push genuine ones out
of it. Header bytes that must stay readable (an RTP header) go in as associated data.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from punchline.crypto.handshake import KEY_BYTES, SessionKeys
from punchline.errors import LocalError, RemoteError

TAG_BYTES = 16
MAX_INDEX = 2**64 - 1
DEFAULT_WINDOW = 1024


class PacketError(RemoteError):
    """A protected packet was refused."""


class ReplayedPacket(PacketError):
    """The packet's index was already accepted or is older than the replay window."""


class ForgedPacket(PacketError):
    """The packet does not authenticate: wrong key, or altered in transit."""


class ReplayWindow:
    """Which of the last `size` indexes below the highest accepted one were seen (RFC 3711 §3.3.2).

    Bit i of the mask records whether `highest - i` was accepted. `check` never changes
    state; `accept` is called only once the packet has authenticated.
    """

    def __init__(self, size: int = DEFAULT_WINDOW) -> None:
        if not isinstance(size, int) or size < 1:
            raise LocalError("the replay window must hold at least one packet")
        self.size = size
        self.highest = -1  # nothing accepted yet
        self._mask = 0

    def check(self, index: int) -> bool:
        """True if `index` is new: above the highest, or inside the window and not yet seen."""
        if index < 0:
            return False
        if index > self.highest:
            return True
        offset = self.highest - index
        if offset >= self.size:
            return False
        return not (self._mask >> offset) & 1

    def accept(self, index: int) -> None:
        """Record `index` as received; it must have passed `check`."""
        if not self.check(index):
            raise LocalError(f"index {index} is a replay or too old; check it first")
        if index > self.highest:
            shift = index - self.highest
            # a jump past the whole window forgets everything; never build a huge int
            self._mask = 1 if shift >= self.size else ((self._mask << shift) | 1)
            self._mask &= (1 << self.size) - 1
            self.highest = index
        else:
            self._mask |= 1 << (self.highest - index)


def nonce(index: int) -> bytes:
    """The 96-bit AEAD nonce of packet `index`: 4 zero bytes, then the index big-endian."""
    return bytes(4) + index.to_bytes(8, "big")


class PacketCipher:
    """Seal with `keys.send`, open with `keys.receive`; one instance per session and purpose.

    Two ciphers must never share a send key (their indexes would collide in the nonce):
    derive a separate `SessionKeys` per purpose, as `crypto.srtp.SecureRtp` does for RTP and RTCP.
    """

    def __init__(self, keys: SessionKeys, window: int = DEFAULT_WINDOW) -> None:
        if len(keys.send) != KEY_BYTES or len(keys.receive) != KEY_BYTES:
            raise LocalError(f"packet keys must be {KEY_BYTES} bytes each")
        self._seal = ChaCha20Poly1305(keys.send)
        self._open = ChaCha20Poly1305(keys.receive)
        self.window = ReplayWindow(window)
        self.last_sent = -1

    def seal(self, index: int, aad: bytes, plaintext: bytes) -> bytes:
        """Encrypt and authenticate `plaintext`, authenticate `aad`; return ciphertext || tag.

        `index` must be higher than every index sealed before with this cipher: a repeated
        nonce under ChaCha20-Poly1305 would reveal plaintext and let anyone forge packets.
        """
        if not isinstance(index, int) or not self.last_sent < index <= MAX_INDEX:
            raise LocalError(
                f"packet index {index} must be above the last one sealed ({self.last_sent}) "
                f"and at most {MAX_INDEX}"
            )
        self.last_sent = index
        return self._seal.encrypt(nonce(index), plaintext, aad)

    def open_untrusted(self, index: int, aad: bytes, ciphertext: bytes) -> bytes:
        """Check replay, then authenticate and decrypt; only `PacketError` subclasses escape."""
        if not isinstance(index, int) or not 0 <= index <= MAX_INDEX:
            raise ForgedPacket(f"packet index {index} is out of range")
        if not self.window.check(index):
            raise ReplayedPacket(
                f"packet {index} was already received or is more than {self.window.size} "
                f"packets older than the newest ({self.window.highest})"
            )
        if len(ciphertext) < TAG_BYTES:
            raise ForgedPacket("packet is shorter than its authentication tag")
        try:
            plaintext = self._open.decrypt(nonce(index), ciphertext, aad)
        except InvalidTag as exc:
            raise ForgedPacket(
                f"packet {index} does not authenticate (wrong key or altered)"
            ) from exc
        self.window.accept(index)
        return plaintext
