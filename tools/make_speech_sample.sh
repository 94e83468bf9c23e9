#!/usr/bin/env bash
# Regenerate src/punchline/assets/speech-16k.wav, the speech sample punchline ships.
#
# ~9 s of clear synthetic English (four Harvard sentences, IEEE 1969) spoken by Debian's
# espeak-ng, converted to 16 kHz mono 16-bit by punchline's own read_wav (libsoxr resampling)
# and normalised to a -3 dBFS peak. Synthetic speech is used because it is free of rights and
# reproducible; PESQ scores it like natural speech for our purpose (comparing the same talker
# before and after the network). Not run by the tests; needs: apt-get install espeak-ng, and
# the project's virtual environment (.venv).
#
# Usage: tools/make_speech_sample.sh [OUTPUT.wav]
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."

out=${1:-src/punchline/assets/speech-16k.wav}
text="The birch canoe slid on the smooth planks. Glue the sheet to the dark blue background. \
It is easy to tell the depth of a well. These days a chicken leg is a rare dish."

command -v espeak-ng >/dev/null || { echo "espeak-ng is missing: apt-get install espeak-ng" >&2; exit 1; }
tmp=$(mktemp --suffix=.wav)
trap 'rm -f "$tmp"' EXIT

# en-us voice, 165 words per minute, default pitch; espeak-ng writes 22.05 kHz mono 16-bit.
espeak-ng -v en-us -s 165 -w "$tmp" "$text"

.venv/bin/python - "$tmp" "$out" <<'PY'
import sys
from pathlib import Path

import numpy as np

from punchline.voice.wav import read_wav, write_wav

samples = read_wav(Path(sys.argv[1]), 16000).astype(np.float64)
peak = float(np.max(np.abs(samples))) or 1.0
target = 32767 * 10 ** (-3 / 20)  # -3 dBFS
scaled = np.round(samples * (target / peak)).astype(np.int16)
write_wav(Path(sys.argv[2]), scaled, 16000)
print(f"wrote {sys.argv[2]}: {len(scaled) / 16000:.2f} s, 16 kHz mono 16-bit")
PY
