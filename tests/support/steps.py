"""Scenario steps for the integration tests: a failure names its step and shows the logs."""

from __future__ import annotations

from collections.abc import Callable

from twisted.trial.unittest import SynchronousTestCase

from twistvpn.testing import netns


def run_step(case: SynchronousTestCase, network: netns.Network, name: str,
             check: Callable[[], object],
             catch: tuple[type[BaseException], ...] = (AssertionError, netns.HarnessError)
             ) -> None:
    """
    Run C{check}; if it fails, print every process's log of C{network} and
    fail C{case} with the step's C{name} heading the message.
    """
    try:
        check()
    except catch as e:
        for process in network.processes:
            print(f"==== {' '.join(process.argv[-12:])}\n{process.log()[-4000:]}")
        raise case.failureException(f"{name}: {e}") from e
