-- The first schema of the rendezvous database.  Kept so that databases
-- written by older versions can be migrated (upgrade-to-v2.sql) and tested.

CREATE TABLE `version` (
  `version` INTEGER -- contains one row
);

CREATE TABLE `networks` (
  `id` VARCHAR PRIMARY KEY,       -- 16 hex digits
  `name` VARCHAR NOT NULL,
  `subnet` VARCHAR NOT NULL,      -- IPv4 CIDR
  `private` INTEGER NOT NULL,     -- 1: members need authorization
  `created` REAL NOT NULL
);

CREATE TABLE `nodes` (
  `public_key` BLOB PRIMARY KEY,  -- the node's WireGuard static key
  `node_id` VARCHAR NOT NULL UNIQUE,
  `name` VARCHAR NOT NULL,
  `created` REAL NOT NULL,
  `last_seen` REAL,
  `endpoint` VARCHAR              -- "host:port" seen on the first UDP port
);

CREATE TABLE `members` (
  `network_id` VARCHAR NOT NULL REFERENCES `networks`(`id`) ON DELETE CASCADE,
  `public_key` BLOB NOT NULL REFERENCES `nodes`(`public_key`),
  `authorized` INTEGER NOT NULL,
  `ip` VARCHAR,
  `created` REAL NOT NULL,
  PRIMARY KEY (`network_id`, `public_key`),
  UNIQUE (`network_id`, `ip`)
);
