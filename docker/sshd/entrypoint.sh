#!/bin/sh
# Start sshd for the "deploy" user: host keys generated on first start (kept while the
# container lives), authorized_keys copied from the mounted public key with the owner and
# modes sshd insists on.
set -eu
KEYS=${AUTHORIZED_KEYS_FILE:-/etc/vmfarm/authorized_keys}
if [ ! -s "$KEYS" ]; then
    echo "vmfarm-sshd: no public key at $KEYS: mount one (e.g. ./.vmfarm/ssh/id_ed25519.pub)" >&2
    exit 1
fi
ssh-keygen -A >/dev/null
install -d -o deploy -g deploy -m 0700 /home/deploy/.ssh
install -o deploy -g deploy -m 0600 "$KEYS" /home/deploy/.ssh/authorized_keys
exec /usr/sbin/sshd -D -e "$@"
