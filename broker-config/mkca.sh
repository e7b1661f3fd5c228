#!/usr/bin/env bash
# A development certificate authority for the edge-agent broker.
#
#   mkca.sh [--dir DIR] server [--san DNS:name|IP:addr ...]
#       DIR/ca.key + ca.crt (created once) and DIR/server.key + server.crt, valid for
#       localhost and 127.0.0.1 plus every --san; the files tls.conf names.
#   mkca.sh [--dir DIR] client NAME [--out DIR]
#       OUT/NAME.crt + NAME.key signed by the CA with CN=NAME (the device id), for
#       mqtt.cert / mqtt.key and require_certificate true.
#
# ECDSA P-256 keys: fast to make and to handshake on a Raspberry Pi. For production,
# use your organisation's PKI; the broker needs only cafile/certfile/keyfile.
set -euo pipefail

dir=/etc/mosquitto/edge
days=825
usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --dir) dir="$2"; shift 2 ;;
        --days) days="$2"; shift 2 ;;
        -h|--help) usage ;;
        -*) echo "mkca.sh: unknown option $1" >&2; usage ;;
        *) break ;;
    esac
done
[ $# -ge 1 ] || usage
kind="$1"; shift
mkdir -p "$dir"

ensure_ca() {
    [ -f "$dir/ca.crt" ] && [ -f "$dir/ca.key" ] && return
    ( umask 077; openssl ecparam -name prime256v1 -genkey -noout -out "$dir/ca.key" )
    openssl req -x509 -new -key "$dir/ca.key" -sha256 -days "$days" \
        -subj "/CN=edge-agent development CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" -out "$dir/ca.crt"
}

# Key readable by the broker after it drops to user mosquitto, by nobody else.
broker_readable() {
    if [ "$(id -u)" -eq 0 ] && getent group mosquitto >/dev/null; then
        chgrp mosquitto "$@"; chmod 0640 "$@"
    fi
}

sign() {  # sign KEY CRT CN EXTFILE
    local csr
    csr="$(mktemp)"
    openssl req -new -key "$1" -subj "/CN=$3" -out "$csr"
    openssl x509 -req -in "$csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
        -days "$days" -sha256 -extfile "$4" -out "$2" 2>/dev/null
    rm -f "$csr" "$4"
}

case "$kind" in
    server)
        sans="DNS:localhost,IP:127.0.0.1"
        while [ $# -gt 0 ]; do
            case "$1" in
                --san) sans="$sans,$2"; shift 2 ;;
                *) echo "mkca.sh: unknown argument $1" >&2; usage ;;
            esac
        done
        ensure_ca
        ( umask 077; openssl ecparam -name prime256v1 -genkey -noout -out "$dir/server.key" )
        ext="$(mktemp)"
        printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n' "$sans" > "$ext"
        sign "$dir/server.key" "$dir/server.crt" "edge-agent broker" "$ext"
        broker_readable "$dir/server.key" "$dir/server.crt" "$dir/ca.crt"
        echo "$dir/server.crt ($sans)" ;;
    client)
        [ $# -ge 1 ] || usage
        name="$1"; shift
        out="$dir"
        while [ $# -gt 0 ]; do
            case "$1" in
                --out) out="$2"; shift 2 ;;
                *) echo "mkca.sh: unknown argument $1" >&2; usage ;;
            esac
        done
        [[ "$name" =~ ^[A-Za-z0-9_.-]+$ ]] || { echo "mkca.sh: name: '$name' must match [A-Za-z0-9_.-]+" >&2; exit 2; }
        ensure_ca
        mkdir -p "$out"
        ( umask 077; openssl ecparam -name prime256v1 -genkey -noout -out "$out/$name.key" )
        ext="$(mktemp)"
        printf 'extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n' > "$ext"
        sign "$out/$name.key" "$out/$name.crt" "$name" "$ext"
        echo "$out/$name.crt" ;;
    *) echo "mkca.sh: '$kind': expected server or client" >&2; usage ;;
esac
