#!/bin/sh
# Prints Redis's ACL file for vmfarm from the passwords in the environment (docker-compose.yml
# runs it at the start of the redis service; tests/service/test_redis_acl.py runs it too).
#
#   default   off: a connection without a user and password can do nothing
#   vmfarm    the server, the control worker, the metrics exporter, the autoscaler: every
#             data command, none of the dangerous ones (FLUSHALL, CONFIG, KEYS, DEBUG, ACL, ...)
#   worker    the region workers: the same commands, its own password (rotate it alone)
#   flower    Flower: reads every key and listens to the events; writes only its reply
#             queues, its bindings and its own registration. It cannot push onto a worker
#             queue: Flower's task API (async-apply) gets NOPERM, and a worker would refuse
#             the unsigned message anyway.
#
# Passwords become sha256 hashes ("#<hex>") in the file, never written in clear.
set -eu
: "${REDIS_PASSWORD:?set REDIS_PASSWORD (the vmfarm user) in .env}"
: "${REDIS_WORKER_PASSWORD:?set REDIS_WORKER_PASSWORD in .env}"
: "${REDIS_FLOWER_PASSWORD:?set REDIS_FLOWER_PASSWORD in .env}"

hash() {
    printf '%s' "$1" | sha256sum | cut -d' ' -f1
}

rules='~* &* +@all -@dangerous +info'
echo "user default off"
echo "user vmfarm on #$(hash "$REDIS_PASSWORD") $rules"
echo "user worker on #$(hash "$REDIS_WORKER_PASSWORD") $rules"
echo "user flower on #$(hash "$REDIS_FLOWER_PASSWORD") %R~* %RW~*.reply.celery.pidbox* %RW~_kombu.binding.reply.celery.pidbox %RW~_kombu.binding.celeryev %RW~celeryev.* %RW~_kombu.binding_permanent.celeryev %RW~_kombu.binding_permanent.reply.celery.pidbox %RW~_kombu.binding_deadlines %RW~vmfarm:flower:watchers &* -@all +@read +@connection +@pubsub +@transaction +@scripting +@list +@set +@sortedset +@keyspace -@dangerous +info +time"
