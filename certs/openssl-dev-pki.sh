#!/bin/sh
# The development PKI made with the openssl command line instead of `cargo xtask certs`: the same
# six files, the same X.509 v3 extensions. Certificates from any other CA tooling work if they
# carry the same extensions (above all subjectAltName, which rustls requires).
#
#   certs/openssl-dev-pki.sh [DIR]      (default DIR: certs/dev; refuses to overwrite)
set -eu
out=${1:-certs/dev}
if [ -e "$out/ca.pem" ]; then
    echo "$out already holds a PKI; remove it first" >&2
    exit 1
fi
mkdir -p "$out"
cd "$out"
umask 077 # keys are created readable by their owner only

# 1. The CA: may sign leaf certificates only (pathlen 0).
openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -keyout ca.key -out ca.pem -days 3650 -subj "/CN=Bookstore development CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature"

# 2. A leaf: $1 = file stem, $2 = common name, $3 = extended key usage, $4 = subjectAltName.
leaf() {
    openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
        -keyout "$1.key" -out "$1.csr" -subj "/CN=$2"
    printf '%s\n' \
        "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature,keyEncipherment" \
        "extendedKeyUsage=$3" \
        "subjectAltName=$4" \
        "authorityKeyIdentifier=keyid" >"$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial \
        -days 825 -extfile "$1.ext" -out "$1.pem"
    rm -f "$1.csr" "$1.ext"
}

leaf server recommendations serverAuth \
    "DNS:recommendations,DNS:localhost,IP:127.0.0.1,IP:::1,DNS:recommendations.bookstore,DNS:recommendations.bookstore.svc,DNS:recommendations.bookstore.svc.cluster.local"
leaf client marketplace clientAuth "DNS:marketplace"

rm -f ca.srl
chmod 644 ca.pem server.pem client.pem
echo "created a development PKI with openssl in $out"
