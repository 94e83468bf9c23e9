"""Data files shipped inside the package (found with `importlib.resources`).

`speech-16k.wav` is ~10 s of synthetic English speech (espeak-ng), 16 kHz mono 16-bit, used by
tests, benches and the demo as a reproducible talker; `tools/make_speech_sample.sh` regenerates it.
"""
