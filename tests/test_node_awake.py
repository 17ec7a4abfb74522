"""Tests for twistvpn.node.awake: waking the reactor while traffic flows."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial import unittest

from twistvpn.node.awake import IDLE_LOOK, STAY_AWAKE_PERIOD, StayAwake


class StayAwakeTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.packets = 0
        self.awake = StayAwake(self.clock, lambda: self.packets, interval=0.01, period=10.0)

    def next_delay(self) -> float:
        [call] = self.clock.getDelayedCalls()
        return call.getTime() - self.clock.seconds()

    def test_defaults(self) -> None:
        awake = StayAwake(self.clock, lambda: 0)
        self.assertEqual((awake.interval, awake.period), (0.01, STAY_AWAKE_PERIOD))
        self.assertRaises(ValueError, StayAwake, self.clock, lambda: 0, 0)

    def test_quiet_node_only_looks(self) -> None:
        self.awake.start()
        self.assertAlmostEqual(self.next_delay(), IDLE_LOOK)
        self.clock.advance(IDLE_LOOK)
        self.assertTrue(self.awake.idle)
        self.assertAlmostEqual(self.next_delay(), IDLE_LOOK)

    def test_awake_while_traffic_flows_then_sleeps(self) -> None:
        self.awake.start()
        self.packets += 1
        self.clock.advance(IDLE_LOOK)  # the look notices the traffic
        self.assertFalse(self.awake.idle)
        self.assertAlmostEqual(self.next_delay(), 0.01)
        for _ in range(990):  # 9.9 s of 10 ms wake-ups, nothing more sent
            self.clock.advance(0.01)
        self.assertFalse(self.awake.idle)
        self.assertAlmostEqual(self.next_delay(), 0.01)
        for _ in range(15):  # past 10 s after the traffic: back to looking
            self.clock.advance(0.01)
        self.assertTrue(self.awake.idle)
        self.assertGreater(self.next_delay(), 0.9 * IDLE_LOOK)  # the look, made 10-odd ms ago
        self.packets += 5
        self.clock.advance(IDLE_LOOK)
        self.assertAlmostEqual(self.next_delay(), 0.01)

    def test_each_packet_extends(self) -> None:
        self.awake.start()
        self.packets += 1
        self.clock.advance(IDLE_LOOK)
        for _ in range(20):  # a packet every second for 20 s: awake all along
            for _ in range(100):
                self.clock.advance(0.01)
            self.packets += 1
            self.assertAlmostEqual(self.next_delay(), 0.01)

    def test_poke_wakes_at_once(self) -> None:
        """Poked while idle (traffic after a quiet spell), it is awake from then on."""
        self.awake.poke()  # not started: nothing to move
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.awake.start()
        self.assertTrue(self.awake.idle)
        self.packets += 1
        self.awake.poke()
        self.assertFalse(self.awake.idle)
        self.assertAlmostEqual(self.next_delay(), 0.01)
        self.clock.advance(0.01)
        self.assertFalse(self.awake.idle)
        self.awake.poke()  # awake already: nothing changes
        self.assertAlmostEqual(self.next_delay(), 0.01)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_poke_without_traffic_goes_back_to_idle(self) -> None:
        self.awake.start()
        self.awake.poke()
        self.clock.advance(0.01)  # the count did not move
        self.assertTrue(self.awake.idle)
        self.assertAlmostEqual(self.next_delay(), IDLE_LOOK)

    def test_stop_and_start(self) -> None:
        self.awake.start()
        self.awake.start()  # once only
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.awake.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.awake.stop()
        self.awake.start()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
