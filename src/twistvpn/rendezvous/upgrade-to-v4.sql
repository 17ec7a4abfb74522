-- v4: each network's DNS domain, set by an admin (NULL: the default, NAME.twistvpn.internal),
-- and each member's name in its network (NULL: the node's own name).

ALTER TABLE `networks` ADD COLUMN `domain` VARCHAR;
ALTER TABLE `members` ADD COLUMN `name` VARCHAR;
