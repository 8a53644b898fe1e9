#!/usr/bin/env bash
# Builds artifacts from docs/artifact-format.md alone - openssl, zstd, GNU tar and Python's
# json/hashlib, no upgraded code - and checks that upgradectl accepts them. If this breaks, the
# document and the code disagree.
set -euo pipefail
U=$(realpath "${1:?usage: independent_producer_test.sh path/to/upgradectl}")
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
cd "$T"
mkdir -p tree/bin keys
printf '#!/bin/sh\necho indie\n' >tree/bin/run && chmod 755 tree/bin/run
head -c 300000 /dev/urandom >tree/blob
tar -C tree -cf - . | zstd -q -o payload.tar.zst

/usr/bin/python3 - <<'PY'
import hashlib, json
data = open("payload.tar.zst", "rb").read()
cs = 65536
manifest = {
    "format": 1, "app": "indie", "version": "0.1.0", "created": "2026-01-02T03:04:05Z",
    "units": ["indie.service"], "hooks": {"health": {"path": "bin/run", "timeout_s": 5}},
    "payload": {"compression": "zstd", "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "chunk_size": cs,
                "chunks": [hashlib.sha256(data[i:i + cs]).hexdigest() for i in range(0, len(data), cs)]},
}
open("manifest.json", "w").write(json.dumps(manifest))
PY

openssl genpkey -algorithm ed25519 -out ed.pem
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ec.pem 2>/dev/null
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out rsa.pem 2>/dev/null
entries=""
for k in ed ec rsa; do
  openssl pkey -in $k.pem -pubout -out keys/$k.pem
  id=$(openssl pkey -pubin -in keys/$k.pem -outform DER | openssl dgst -sha256 -r | cut -d' ' -f1)
  case $k in
    ed) alg=ed25519; openssl pkeyutl -sign -rawin -inkey ed.pem -in manifest.json -out $k.sig ;;
    ec) alg=ecdsa-sha256; openssl dgst -sha256 -sign ec.pem -out $k.sig manifest.json ;;
    rsa) alg=rsa-pss-sha256
         openssl dgst -sha256 -sigopt rsa_padding_mode:pss -sigopt rsa_pss_saltlen:32 -sign rsa.pem -out $k.sig manifest.json ;;
  esac
  entries+="${entries:+,}{\"key_id\":\"$id\",\"algorithm\":\"$alg\",\"signature\":\"$(base64 -w0 $k.sig)\"}"
done
printf '{"format":1,"signatures":[%s]}' "$entries" >manifest.sig
# docs/artifact-format.md §2.2: the canonical headers and end.
tar --format=ustar --owner=0 --group=0 --numeric-owner --mode=0644 --mtime=@0 -b1 \
  -cf indie.upd manifest.json manifest.sig payload.tar.zst

"$U" verify --keys keys --threshold 3 indie.upd
"$U" unpack --keys keys --threshold 3 indie.upd out
diff -r tree out
"$U" inspect indie.upd | grep -q "indie.service"
echo "1 passed, 0 failed"
