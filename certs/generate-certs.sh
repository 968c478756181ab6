#!/bin/sh
# Writes a self-signed certificate chain like the one the official proxy's
# generate-certs.sh makes, for operators who want files to keep: a CA with
# a random name and a leaf certificate for <random>.net signed by it.
# (whatsapp_proxy itself makes one self-signed certificate for your
# --public-host name instead: see tutorial.md, Step 5.)
#
#   sh certs/generate-certs.sh [DIR]          (make certs does this for certs/)
#   SSL_DNS=proxy.example.org,alt.example.org SSL_IP=192.0.2.10 sh certs/generate-certs.sh
#   KEY=rsa2048 sh certs/generate-certs.sh    (default KEY=ec256)
#
# Use the result with: whatsapp_proxy --cert DIR/cert.pem --key DIR/key.pem
# Files: ca.pem, cert.pem (leaf then CA), key.pem (mode 0600),
# proxy.whatsapp.net.pem (key and chain in one file, as HAProxy wants it).
set -eu
dir=${1:-certs}
mkdir -p "$dir"
cd "$dir"
# Every file is made in a temporary folder and moved in at the end: files
# left by another user (say, root after `sudo make run`) are replaced, not
# written into, and a failure leaves the old set whole.
[ -w . ] || { echo "generate-certs.sh: cannot write into $dir: it belongs to $(stat -c %U .). Run this as that user, or give another folder: sh certs/generate-certs.sh DIR" >&2; exit 1; }
umask 077
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

random_name() { head -c 200 /dev/urandom | tr -dc 'a-zA-Z0-9' | head -c 16; }
new_key() {
    case "${KEY:-ec256}" in
        ec256)   openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" ;;
        rsa2048) openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$1" ;;
        rsa4096) openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:4096 -out "$1" ;;
        *) echo "KEY must be ec256, rsa2048 or rsa4096" >&2; exit 2 ;;
    esac
}

ca_name=$(random_name)
leaf_name="$(random_name).net"

# The subjectAltName list: the leaf's own name, then SSL_DNS and SSL_IP.
alt="DNS:$leaf_name"
for name in $(echo "${SSL_DNS:-}" | tr ',' ' '); do alt="$alt,DNS:$name"; done
for ip in $(echo "${SSL_IP:-}" | tr ',' ' '); do alt="$alt,IP:$ip"; done

# The CA: 100 years, as the reference. Its key stays in a temporary folder and
# is deleted at the end, so nobody can sign anything else with it later.
new_key "$work/ca-key.pem"
openssl req -x509 -new -key "$work/ca-key.pem" -days 36500 -subj "/CN=$ca_name" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" -out "$work/ca.pem"

# The leaf: 10 years, as the reference.
new_key "$work/key.pem"
openssl req -new -key "$work/key.pem" -subj "/CN=$leaf_name" -out "$work/leaf.csr"
cat > "$work/leaf.ext" <<EXT
basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = $alt
EXT
openssl x509 -req -in "$work/leaf.csr" -CA "$work/ca.pem" -CAkey "$work/ca-key.pem" \
    -CAcreateserial -CAserial "$work/ca.srl" -days 3650 \
    -extfile "$work/leaf.ext" -out "$work/leaf.pem"
cat "$work/leaf.pem" "$work/ca.pem" > "$work/cert.pem"
cat "$work/key.pem" "$work/cert.pem" > "$work/proxy.whatsapp.net.pem"
chmod 600 "$work/key.pem" "$work/proxy.whatsapp.net.pem"
chmod 644 "$work/ca.pem" "$work/cert.pem"
for file in ca.pem cert.pem key.pem proxy.whatsapp.net.pem; do
    mv -f "$work/$file" "$file"
done
echo "Wrote $dir/cert.pem and $dir/key.pem for $leaf_name ($alt)"
