"""The voice layer: what turns sound into packets and packets back into sound.

Everything here speaks one format, 16 kHz mono signed 16-bit PCM ("wideband") cut into 20 ms
frames of 320 samples, because that is what Opus carries best for speech at VoIP bitrates and
what PESQ's wideband mode (ITU-T P.862.2) scores. Converting anything else (other rates,
channel counts, sample formats) happens once, at the edge, in `wav`.

- `codec`: Opus encoder and decoder over the real libopus, with loss concealment and in-band FEC.
- `jitter`: a sans-I/O adaptive jitter buffer that turns packets arriving at random times into
  one playout decision per frame tick.
- `wav`: reading any PCM WAV, writing 16-bit WAVs atomically, frame sources and sinks.
- `quality`: time alignment and PESQ scoring, so tests and benches can say how a call sounds.
"""
