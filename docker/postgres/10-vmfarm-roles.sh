#!/bin/sh
# The ledger's login roles, made once when the postgres service creates its database (the
# image runs /docker-entrypoint-initdb.d/*.sh as the owner). The group roles and their grants
# are app/dbroles.py's (the control worker's migrations apply them):
#   vmfarm_region  LOGIN, member of vmfarm_worker   the region workers
#   vmfarm_api     LOGIN, member of vmfarm_server   the server
# Passwords come from the environment through psql variables: never on a command line, never
# in this file. Safe to run again (tests/service/test_compose_roles.py runs it for real).
set -eu
: "${POSTGRES_WORKER_PASSWORD:?set POSTGRES_WORKER_PASSWORD in .env}"
: "${POSTGRES_SERVER_PASSWORD:?set POSTGRES_SERVER_PASSWORD in .env}"

psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
    ${PGHOST:+--host "$PGHOST"} \
    -v worker_pw="$POSTGRES_WORKER_PASSWORD" -v server_pw="$POSTGRES_SERVER_PASSWORD" <<'SQL'
SELECT format('CREATE ROLE %I NOLOGIN', r) FROM unnest(ARRAY['vmfarm_server', 'vmfarm_worker', 'vmfarm_readonly']) AS r
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = r) \gexec
SELECT 'CREATE ROLE vmfarm_region LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'vmfarm_region') \gexec
SELECT 'CREATE ROLE vmfarm_api LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'vmfarm_api') \gexec
SELECT format('ALTER ROLE vmfarm_region LOGIN PASSWORD %L', :'worker_pw') \gexec
SELECT format('ALTER ROLE vmfarm_api LOGIN PASSWORD %L', :'server_pw') \gexec
GRANT vmfarm_worker TO vmfarm_region;
GRANT vmfarm_server TO vmfarm_api;
SQL
