#!/bin/sh
# certbot deploy hook: after each renewal, copy the new certificate where the
# proxy (an unprivileged user) can read it, and ask it to reload (SIGHUP):
# open connections are not dropped.
#
# Install once, as root, in the project folder, after the proxy has started
# once under systemd (that makes /var/lib/whatsapp_proxy) and certbot has
# your certificate:
#   install -D -m 0755 contrib/certbot-deploy-hook.sh \
#       /etc/letsencrypt/renewal-hooks/deploy/whatsapp_proxy.sh
# Then run it once by hand, for the first copy (NAME: your server's name):
#   RENEWED_LINEAGE=/etc/letsencrypt/live/NAME sh /etc/letsencrypt/renewal-hooks/deploy/whatsapp_proxy.sh
# The same command tests it at any time. `certbot renew --dry-run` does not
# run deploy hooks: certbot 2.1 (Debian 12's) cannot, and --run-deploy-hooks
# needs certbot 2.3 or newer.
#
# certbot sets RENEWED_LINEAGE to /etc/letsencrypt/live/NAME.
set -eu
state=/var/lib/whatsapp_proxy
fail() {
    echo "whatsapp_proxy deploy hook: $*" >&2
    exit 1
}
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || fail "run me as root: become root with su -, then run me again."
    fail "run me as root: put sudo in front of the command (or become root with su -, then run me again)."
fi
[ -n "${RENEWED_LINEAGE:-}" ] ||
    fail "RENEWED_LINEAGE is not set. certbot sets it; by hand, run, as root: RENEWED_LINEAGE=/etc/letsencrypt/live/NAME sh $0 (NAME: your server's name)"
for file in fullchain.pem privkey.pem; do
    [ -f "$RENEWED_LINEAGE/$file" ] ||
        fail "there is no $RENEWED_LINEAGE/$file. Is the name right? See the names certbot has, as root, with: ls /etc/letsencrypt/live/"
done
# Under DynamicUser the state folder is a symbolic link: -d and stat -L
# follow it to the folder itself, which systemd gives to the service's user.
[ -d "$state" ] ||
    fail "$state does not exist yet: systemd makes it at the proxy's first start. Start the proxy once, as root, with: systemctl start whatsapp_proxy, then run me again."
owner=$(stat -L -c %u "$state")
install -m 0644 -o "$owner" "$RENEWED_LINEAGE/fullchain.pem" "$state/fullchain.pem"
install -m 0600 -o "$owner" "$RENEWED_LINEAGE/privkey.pem" "$state/privkey.pem"
echo "whatsapp_proxy deploy hook: copied the certificate of ${RENEWED_LINEAGE##*/} into $state/"
# A running proxy reloads it (SIGHUP); a stopped one reads it when it starts.
systemctl try-reload-or-restart whatsapp_proxy
