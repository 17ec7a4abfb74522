-- v3: pre-auth keys, for machines nobody can click "authorize" for.

CREATE TABLE `auth_keys` (
  `id` VARCHAR PRIMARY KEY,          -- 12 hex digits, shown to admins
  `network_id` VARCHAR NOT NULL REFERENCES `networks`(`id`) ON DELETE CASCADE,
  `secret_hash` BLOB NOT NULL UNIQUE, -- SHA-256 of the secret; the secret is never stored
  `reusable` INTEGER NOT NULL,
  `uses` INTEGER NOT NULL DEFAULT 0,
  `expires` REAL,                    -- seconds since the epoch, or NULL for never
  `name_prefix` VARCHAR,
  `revoked` INTEGER NOT NULL DEFAULT 0,
  `created` REAL NOT NULL
);
CREATE INDEX `auth_keys_by_network` ON `auth_keys` (`network_id`);
