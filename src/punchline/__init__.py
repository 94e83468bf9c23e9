"""punchline: peer-to-peer voice calls in the classic Skype architecture."""

__version__ = "0.1.0"
