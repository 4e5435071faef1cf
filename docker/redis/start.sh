#!/bin/sh
# The redis service's command: write the ACL file from .env's passwords, then run Redis with it.
# noeviction: an evicted key would silently lose a queue or a chord's state.
set -eu
umask 077
sh /etc/vmfarm-redis/users.acl.sh > /data/users.acl
exec redis-server --appendonly yes --maxmemory-policy noeviction --aclfile /data/users.acl
