-- The current schema of the rendezvous database in PostgreSQL, for new databases
-- (schema-v5.sql is sqlite's; the two hold the same tables and columns, and
-- this one the instances' shared identity too).  A later version adds a
-- postgresql-upgrade-to-vN.sql beside sqlite's.

CREATE TABLE version (
  version INTEGER -- contains one row
);

CREATE TABLE networks (
  id VARCHAR PRIMARY KEY,       -- 16 hex digits
  name VARCHAR NOT NULL,
  subnet VARCHAR NOT NULL,      -- IPv4 CIDR
  private INTEGER NOT NULL,     -- 1: members need authorization
  created DOUBLE PRECISION NOT NULL,
  revision INTEGER NOT NULL DEFAULT 0, -- bumped on every change to the map
  domain VARCHAR                 -- DNS domain of its members; NULL: NAME.twistvpn.internal
);

CREATE TABLE nodes (
  public_key BYTEA PRIMARY KEY,  -- the node's WireGuard static key
  node_id VARCHAR NOT NULL UNIQUE,
  name VARCHAR NOT NULL,
  created DOUBLE PRECISION NOT NULL,
  last_seen DOUBLE PRECISION,
  endpoint VARCHAR,             -- "host:port" seen on the first UDP port
  endpoint2 VARCHAR,            -- "host:port" seen on the second UDP port
  local_endpoints VARCHAR NOT NULL DEFAULT '[]', -- JSON list of "host:port"
  kind VARCHAR NOT NULL DEFAULT 'node'  -- 'node' (runs twistvpn) or 'device' (stock WireGuard)
);

CREATE TABLE members (
  network_id VARCHAR NOT NULL REFERENCES networks(id) ON DELETE CASCADE,
  public_key BYTEA NOT NULL REFERENCES nodes(public_key),
  authorized INTEGER NOT NULL,
  ip VARCHAR,
  created DOUBLE PRECISION NOT NULL,
  name VARCHAR,                 -- the admin's (or a pre-auth key's prefix) name; NULL: the node's
  PRIMARY KEY (network_id, public_key),
  UNIQUE (network_id, ip)
);
CREATE INDEX members_by_node ON members (public_key);

CREATE TABLE auth_keys (
  id VARCHAR PRIMARY KEY,          -- 12 hex digits, shown to admins
  network_id VARCHAR NOT NULL REFERENCES networks(id) ON DELETE CASCADE,
  secret_hash BYTEA NOT NULL UNIQUE, -- SHA-256 of the secret; the secret is never stored
  reusable INTEGER NOT NULL,
  uses INTEGER NOT NULL DEFAULT 0,
  expires DOUBLE PRECISION,                    -- seconds since the epoch, or NULL for never
  name_prefix VARCHAR,
  revoked INTEGER NOT NULL DEFAULT 0,
  created DOUBLE PRECISION NOT NULL
);
CREATE INDEX auth_keys_by_network ON auth_keys (network_id);

-- What every instance on this database presents to nodes, so that they pin
-- one server key and one certificate: written by the first, read by the rest.
CREATE TABLE shared_identity (
  name VARCHAR PRIMARY KEY,       -- 'server_key', 'tls_cert', 'tls_key'
  value BYTEA NOT NULL
);

-- Every committed change of a network or its members is announced to the
-- rendezvous instances on this database (LISTEN twistvpn_members) by the
-- transaction that makes it: announced if and only if it commits, whichever
-- instance (or admin tool) made it.  The payload is "NETWORK_ID", or
-- "NETWORK_ID REASON PUBLIC_KEY_HEX" when a member lost the network
-- (REASON: deauthorized or deleted).  Map revisions are not announced.
CREATE FUNCTION twistvpn_member_changed() RETURNS trigger AS $$
BEGIN
  IF TG_OP = 'DELETE' THEN
    PERFORM pg_notify('twistvpn_members',
                      OLD.network_id || ' deleted ' || encode(OLD.public_key, 'hex'));
  ELSIF TG_OP = 'UPDATE' AND OLD.authorized = 1 AND NEW.authorized = 0 THEN
    PERFORM pg_notify('twistvpn_members',
                      NEW.network_id || ' deauthorized ' || encode(NEW.public_key, 'hex'));
  ELSE
    PERFORM pg_notify('twistvpn_members', NEW.network_id);
  END IF;
  RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER members_changed AFTER INSERT OR UPDATE OR DELETE ON members
  FOR EACH ROW EXECUTE FUNCTION twistvpn_member_changed();

CREATE FUNCTION twistvpn_network_changed() RETURNS trigger AS $$
BEGIN
  IF TG_OP = 'DELETE' THEN
    PERFORM pg_notify('twistvpn_members', OLD.id);
  ELSE
    PERFORM pg_notify('twistvpn_members', NEW.id);
  END IF;
  RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER networks_changed AFTER UPDATE OF name, subnet, private, domain OR DELETE
  ON networks FOR EACH ROW EXECUTE FUNCTION twistvpn_network_changed();
