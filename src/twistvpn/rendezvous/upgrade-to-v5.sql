-- v5: a node's kind: 'node' (runs twistvpn and registers) or 'device' (a stock
-- WireGuard app an admin added, reached through the relay).

ALTER TABLE `nodes` ADD COLUMN `kind` VARCHAR NOT NULL DEFAULT 'node';
