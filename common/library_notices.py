"""Notices of third-party libraries that are not about anything the user asked for, hidden from the console."""
from __future__ import annotations

import logging

from transformers.utils import logging as transformers_logging


class _OptionalBackendNotice(logging.Filter):
    """Drops transformers' notice that torchvision is absent (image processors fall back to PIL): printed when
    the model code is imported, on every start."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()


def quiet_library_notices() -> None:
    """Install the filters; the entry scripts call this before they import the model code."""
    for handler in transformers_logging._get_library_root_logger().handlers:
        handler.addFilter(_OptionalBackendNotice())
