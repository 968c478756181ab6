#!/bin/sh
# Writes a self-signed certificate chain like the one whatsapp_proxy makes at
# every start, for operators who want files to keep: a CA with a random name
# and a leaf certificate for <random>.net signed by it.
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
    -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.pem

# The leaf: 10 years, as the reference.
new_key key.pem
openssl req -new -key key.pem -subj "/CN=$leaf_name" -out "$work/leaf.csr"
cat > "$work/leaf.ext" <<EXT
basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = $alt
EXT
openssl x509 -req -in "$work/leaf.csr" -CA ca.pem -CAkey "$work/ca-key.pem" \
    -CAcreateserial -CAserial "$work/ca.srl" -days 3650 \
    -extfile "$work/leaf.ext" -out "$work/leaf.pem"
cat "$work/leaf.pem" ca.pem > cert.pem
cat key.pem cert.pem > proxy.whatsapp.net.pem
chmod 600 key.pem proxy.whatsapp.net.pem
chmod 644 ca.pem cert.pem
echo "Wrote $dir/cert.pem and $dir/key.pem for $leaf_name ($alt)"
