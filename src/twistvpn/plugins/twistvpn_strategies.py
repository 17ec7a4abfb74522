"""The built-in traversal strategies, with their default settings."""

from twistvpn.traversal.strategies import (
    BirthdayStrategy,
    LanStrategy,
    PunchStrategy,
    SequentialStrategy,
)

lan = LanStrategy()
punch = PunchStrategy()
birthday = BirthdayStrategy()
sequential = SequentialStrategy()
