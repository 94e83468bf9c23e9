"""Structured logs: one line per event, `key=value` pairs an operator can grep and read.

Servers log at INFO; user-facing commands only show warnings, so their own output stays clean.
`PUNCHLINE_LOG_LEVEL` overrides both, `PUNCHLINE_LOG_JSON=1` switches to JSON lines.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure(default_level: str = "WARNING") -> None:
    level_name = os.environ.get("PUNCHLINE_LOG_LEVEL", default_level).upper()
    level = logging.getLevelNamesMapping().get(level_name, logging.WARNING)
    renderer: structlog.typing.Processor
    if os.environ.get("PUNCHLINE_LOG_JSON") == "1":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.processors.KeyValueRenderer(
            key_order=["timestamp", "level", "component", "event"], drop_missing=True
        )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
