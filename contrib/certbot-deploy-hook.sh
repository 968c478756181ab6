#!/bin/sh
# certbot deploy hook: after each renewal, copy the new certificate where the
# proxy (an unprivileged user) can read it, and ask it to reload (SIGHUP):
# open connections are not dropped.
#
# Install once:
#   sudo install -m 0755 contrib/certbot-deploy-hook.sh \
#       /etc/letsencrypt/renewal-hooks/deploy/whatsapp_proxy.sh
# certbot sets RENEWED_LINEAGE to /etc/letsencrypt/live/YOUR.NAME.
set -eu
state=/var/lib/whatsapp_proxy
[ -n "${RENEWED_LINEAGE:-}" ] || { echo "run me from certbot" >&2; exit 1; }
# The state folder is a symbolic link under DynamicUser: -L follows it to
# the folder itself, which systemd gives to the service's user.
owner=$(stat -L -c %u "$state" 2>/dev/null || echo 0)
install -m 0644 -o "$owner" "$RENEWED_LINEAGE/fullchain.pem" "$state/fullchain.pem"
install -m 0600 -o "$owner" "$RENEWED_LINEAGE/privkey.pem" "$state/privkey.pem"
systemctl reload whatsapp_proxy
