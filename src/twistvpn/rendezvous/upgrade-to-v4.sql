-- v4: each network's DNS domain, set by an admin (NULL: the default, NAME.twistvpn.internal).

ALTER TABLE `networks` ADD COLUMN `domain` VARCHAR;
