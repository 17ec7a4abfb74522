"""Log lines a test can look for."""

from __future__ import annotations

from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase


class LogCatcher:
    """Collects formatted log lines while a test runs."""

    def __init__(self, case: SynchronousTestCase) -> None:
        from twisted.logger import formatEvent

        self.lines: list[str] = []
        observer = lambda event: self.lines.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        case.addCleanup(globalLogPublisher.removeObserver, observer)

    def grep(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]
