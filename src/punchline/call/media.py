"""The media of one call: 20 ms Opus frames in end-to-end encrypted RTP, over one UDP socket.

Sans-I/O except for audio devices: `tick(now)` every 20 ms encodes the next frame from the
source and decodes the next one for the sink; `receive_untrusted(data, now)` takes RTP and
RTCP from the network, whichever path they came by; `datagrams()` gives what to send. Where it
goes is the connectivity agent's business (`connect.agent`): the media session neither knows
nor cares, so a path can change mid-call without the stream noticing. Duplicates (the same
packet by two paths during a switch) are dropped by the SRTP replay window and counted, and
the longest silence between two packets is kept: it is how long a path switch was heard.

RTP follows RFC 3550 with Opus per RFC 7587 (48 kHz RTP clock even for 16 kHz audio), RTCP
sender/receiver reports every 2 s give RTT (LSR/DLSR), loss and jitter.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from punchline.crypto.handshake import SessionKeys
from punchline.crypto.packets import PacketError, ReplayedPacket
from punchline.crypto.srtp import SecureRtp
from punchline.voice.codec import OpusConfig, OpusDecoder, OpusEncoder
from punchline.voice.jitter import JitterBuffer, JitterConfig
from punchline.voice.wav import FrameSource
from punchline.wire import rtp

Address = tuple[str, int]
RTP_TICKS_PER_FRAME = 960  # 20 ms at the 48 kHz Opus RTP clock (RFC 7587 §4.1)
NTP_EPOCH_OFFSET = 2208988800


class FrameSink(Protocol):
    def write(self, frame: np.ndarray) -> None: ...


@dataclass(frozen=True)
class MediaConfig:
    # In-band FEC spends bitrate in proportion to the expected loss: start from none (a clean
    # path keeps full quality, PESQ 4.2 vs 3.55 at 5 %) and follow what RTCP reports.
    opus: OpusConfig = field(default_factory=OpusConfig)
    jitter: JitterConfig = field(default_factory=JitterConfig)
    rtcp_interval: float = 2.0


def _ntp(now: float) -> int:
    seconds = int(now) + NTP_EPOCH_OFFSET
    fraction = int((now % 1.0) * (1 << 32))
    return (seconds << 32) | fraction


def fec_plan(loss: float) -> int:
    """Expected loss (percent) to plan FEC for, from the fraction the peer reports lost.

    A little above the measured rate, since loss comes in bursts; nothing at all on a clean
    path, where FEC would only cost quality; capped where FEC stops paying off.
    """
    if loss <= 0.0:
        return 0
    return min(25, max(2, math.ceil(loss * 100 * 1.5)))


@dataclass
class MediaStats:
    packets_sent: int = 0
    packets_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    rejected: int = 0
    duplicates: int = 0
    # the longest interval between two authentic RTP arrivals after the first (seconds)
    max_gap: float = 0.0
    rtt_ms: float | None = None
    peer_loss: float = 0.0
    peer_jitter_ms: float = 0.0


class MediaSession:
    def __init__(
        self,
        keys: SessionKeys,
        source: FrameSource,
        sink: FrameSink | None,
        now: float,
        config: MediaConfig | None = None,
    ) -> None:
        self.config = config or MediaConfig()
        self._srtp = SecureRtp(keys)
        self._source = source
        self._sink = sink
        self._encoder = OpusEncoder(self.config.opus)
        self._decoder = OpusDecoder()
        self._jitter = JitterBuffer(self.config.jitter)
        self._tracker = rtp.SequenceTracker()
        self.ssrc = secrets.randbits(32)
        self._seq = rtp.random_initial_sequence()  # < 2^15: see its docstring
        self._timestamp = secrets.randbits(32)
        self._out: list[bytes] = []
        self._last_arrival: float | None = None
        self._next_rtcp = now + self.config.rtcp_interval
        self._last_sr: tuple[int, float] | None = None  # (middle 32 bits of NTP, when received)
        self.peer_ssrc: int | None = None
        self._first_index: int | None = None
        self._last_report = (0, 0)  # (expected, received) at the previous report
        self.first_audio_at: float | None = None
        self.stats = MediaStats()
        self.started = now
        self.sending = True

    # ----------------------------------------------------------------- per frame

    def tick(self, now: float) -> None:
        if self.sending:
            self._send_frame(self._source.read(), now)
        self._play(now)
        if now >= self._next_rtcp:
            self._send_rtcp(now)
            self._next_rtcp = now + self.config.rtcp_interval

    def _send_frame(self, frame: np.ndarray, now: float) -> None:
        payload = self._encoder.encode(frame)
        packet = rtp.RtpPacket(
            rtp.OPUS_PAYLOAD_TYPE, self._seq, self._timestamp, self.ssrc, payload
        )
        self._seq = (self._seq + 1) & 0xFFFF
        self._timestamp = (self._timestamp + RTP_TICKS_PER_FRAME) & 0xFFFFFFFF
        data = self._srtp.protect_rtp(packet)
        self._out.append(data)
        self.stats.packets_sent += 1
        self.stats.bytes_sent += len(data)

    def _play(self, now: float) -> None:
        playout = self._jitter.pop(now)
        if playout.kind == "idle":
            return
        if playout.kind == "frame":
            frame = self._decoder.decode(playout.payload)
        elif playout.kind == "fec" and playout.payload is not None:
            frame = self._decoder.decode_fec(playout.payload)
        else:
            frame = self._decoder.decode(None)
        if self._sink is not None:
            self._sink.write(frame)

    # ----------------------------------------------------------------- network

    def receive_untrusted(self, data: bytes, now: float) -> bool:
        """Take one datagram; True if it was authentic media or RTCP of this call."""
        try:
            if rtp.is_rtcp(data):
                self._receive_rtcp(self._srtp.unprotect_rtcp_untrusted(data), now)
            else:
                packet = self._srtp.unprotect_rtp_untrusted(data)
                self._receive_rtp(packet, now)
        except ReplayedPacket:
            self.stats.duplicates += 1
            return False
        except (rtp.RtpError, PacketError):
            self.stats.rejected += 1
            return False
        self.stats.bytes_received += len(data)
        return True

    def _receive_rtp(self, packet: rtp.RtpPacket, now: float) -> None:
        if packet.payload_type != rtp.OPUS_PAYLOAD_TYPE:
            raise rtp.RtpError("unexpected payload type")
        if self.peer_ssrc is None:
            self.peer_ssrc = packet.ssrc
        index = self._tracker.extend(packet.sequence)
        if self._first_index is None:
            self._first_index = index
        self._jitter.push(index, packet.payload, now)
        self.stats.packets_received += 1  # authenticated, so never a duplicate (replay window)
        if self.first_audio_at is None:
            self.first_audio_at = now
        if self._last_arrival is not None:
            self.stats.max_gap = max(self.stats.max_gap, now - self._last_arrival)
        self._last_arrival = now

    def _receive_rtcp(self, data: bytes, now: float) -> None:
        for report in rtp.decode_rtcp_untrusted(data):
            if isinstance(report, rtp.SenderReport):
                self._last_sr = ((report.ntp_timestamp >> 16) & 0xFFFFFFFF, now)
            for block in report.reports:
                if block.ssrc != self.ssrc:
                    continue
                self.stats.peer_loss = block.fraction_lost / 256.0
                self.stats.peer_jitter_ms = block.jitter / 48.0
                self._encoder.set_expected_loss(fec_plan(self.stats.peer_loss))
                if block.lsr:
                    rtt = (_ntp(now) >> 16 & 0xFFFFFFFF) - block.lsr - block.dlsr
                    self.stats.rtt_ms = max(0.0, (rtt & 0xFFFFFFFF) / 65536.0 * 1000.0)

    def _send_rtcp(self, now: float) -> None:
        blocks: tuple[rtp.ReportBlock, ...] = ()
        if self.peer_ssrc is not None:
            expected, received = self._expected(), self.stats.packets_received
            lost = expected - received
            # RFC 3550 A.3: the fraction lost in this interval, cumulative loss since the start
            interval_expected = expected - self._last_report[0]
            interval_lost = interval_expected - (received - self._last_report[1])
            self._last_report = (expected, received)
            fraction = 0
            if interval_expected > 0 and interval_lost > 0:
                fraction = min(255, (interval_lost << 8) // interval_expected)
            lsr, dlsr = 0, 0
            if self._last_sr is not None:
                lsr = self._last_sr[0]
                # never negative: the tick clock may run a little behind arrival times
                dlsr = max(0, int((now - self._last_sr[1]) * 65536))
            blocks = (
                rtp.ReportBlock(self.peer_ssrc, fraction, lost, self._tracker_highest(), 0, lsr,
                                dlsr),
            )  # fmt: skip
        report = rtp.SenderReport(self.ssrc, _ntp(now), self._timestamp, self.stats.packets_sent,
                                  self.stats.bytes_sent, blocks)  # fmt: skip
        self._out.append(self._srtp.protect_rtcp(rtp.encode_rtcp([report])))

    def _tracker_highest(self) -> int:
        return (self._tracker.highest or 0) & 0xFFFFFFFF

    def datagrams(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    # ----------------------------------------------------------------- report

    def _expected(self) -> int:
        if self._first_index is None or self._tracker.highest is None:
            return 0
        return self._tracker.highest - self._first_index + 1

    @property
    def loss(self) -> float:
        """Packets of the peer's stream that never arrived, as a fraction (RFC 3550 A.3)."""
        expected = self._expected()
        return max(0, expected - self.stats.packets_received) / max(1, expected)

    @property
    def jitter_ms(self) -> float:
        return float(self._jitter.stats.jitter_ms)

    @property
    def jitter_stats(self) -> dict[str, Any]:
        return dataclasses.asdict(self._jitter.stats)

    def summary(self) -> dict[str, Any]:
        return {
            "rtt_ms": None if self.stats.rtt_ms is None else round(self.stats.rtt_ms, 1),
            "loss": round(self.loss, 4),
            "jitter_ms": round(self.jitter_ms, 1),
            "bytes_sent": self.stats.bytes_sent,
            "bytes_received": self.stats.bytes_received,
            "duplicates": self.stats.duplicates,
            "max_gap_ms": round(self.stats.max_gap * 1000),
        }
