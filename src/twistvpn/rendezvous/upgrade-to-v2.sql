-- v2: the mapping seen on the second UDP port (to tell endpoint-dependent
-- NAT mappings apart), the node's LAN addresses, a map revision counter.

ALTER TABLE `networks` ADD COLUMN `revision` INTEGER NOT NULL DEFAULT 0;
ALTER TABLE `nodes` ADD COLUMN `endpoint2` VARCHAR;
ALTER TABLE `nodes` ADD COLUMN `local_endpoints` VARCHAR NOT NULL DEFAULT '[]';
CREATE INDEX `members_by_node` ON `members` (`public_key`);
