#!/usr/bin/env bash
# End-to-end test of upgradectl's offline verbs: output, files on disk and exit codes
# (0 ok, 1 failed, 2 usage, 3 policy refused, 4 verification failed).
set -uo pipefail
. "$(dirname "$(realpath "${BASH_SOURCE[0]}")")/../support/checks.sh"
U=$(realpath "${1:?usage: offline_verbs_test.sh path/to/upgradectl}")
T=$(mktemp -d)
trap 'chmod -R u+w "$T" 2>/dev/null; rm -rf "$T"' EXIT
cd "$T"

mkdir -p keys other src/bin src/share
printf '#!/bin/sh\necho v1\n' >src/bin/hello && chmod 755 src/bin/hello
echo data >src/share/data && ln -s ../share/data src/bin/data

check "keygen" 0 "$U" keygen --private release.pem --public keys/release.pem
expect "private key is 0600" test "$(stat -c %a release.pem)" = 600
check "keygen refuses to overwrite" 1 "$U" keygen --private release.pem --public keys/new.pem
expect "refused keygen left no public key" test ! -e keys/new.pem
check "keygen other" 0 "$U" keygen --private other.pem --public other/other.pem

check "pack a directory" 0 "$U" pack --key release.pem --app hello --version 1.0.0 --output h.upd src
check "pack again" 0 "$U" pack --key release.pem --app hello --version 1.0.0 --output h2.upd src
expect "pack is reproducible" cmp -s h.upd h2.upd
check "pack on 3 threads" 0 "$U" pack --threads 3 --key release.pem --app hello --version 1.0.0 --output h4.upd src
expect "pack gives the same bytes on any number of threads" cmp -s h.upd h4.upd
check "pack refuses 0 threads" 2 "$U" pack --threads 0 --key release.pem --app hello --version 1.0.0 --output x.upd src
SOURCE_DATE_EPOCH=1700000000 check "pack with SOURCE_DATE_EPOCH" 0 "$U" pack --key release.pem --app hello --version 1.0.0 --output h3.upd src
expect "SOURCE_DATE_EPOCH sets created" grep -q '2023-11-14T22:13:20Z' <(tar -xOf h3.upd manifest.json)
expect "tar lists the three members in order" test "$(tar -tf h.upd | tr '\n' ' ')" = "manifest.json manifest.sig payload.tar.zst "

tar -C src -czf payload.tar.gz .
check "pack wraps a prebuilt payload" 0 "$U" pack --key release.pem --app hello --version 1.0.1 --output g.upd --payload payload.tar.gz
expect "the payload member is the input, byte for byte" cmp -s payload.tar.gz <(tar -xOf g.upd payload.tar.gz)
check "pack needs DIR or --payload" 2 "$U" pack --key release.pem --app hello --version 1 --output x.upd
check "pack refuses a bad app name" 2 "$U" pack --key release.pem --app ../x --version 1 --output x.upd src
expect "refused pack wrote nothing" test ! -e x.upd

check "verify" 0 "$U" verify --keys keys h.upd
expect "verify names the key" grep -q "signed by trusted key" out.txt
check "verify --json" 0 "$U" verify --keys keys --json h.upd
expect "verify --json is JSON with verified=true" /usr/bin/python3 -c 'import json,sys; assert json.load(open("out.txt"))["verified"] is True'
check "verify with the wrong key" 4 "$U" verify --keys other h.upd
check "verify with an unmet threshold" 4 "$U" verify --keys keys --threshold 2 h.upd
cp h.upd bad.upd && printf 'X' | dd of=bad.upd bs=1 seek=3000 conv=notrunc 2>/dev/null
check "verify a tampered artifact" 4 "$U" verify --keys keys bad.upd
check "verify a missing file" 1 "$U" verify --keys keys nope.upd
check "verify without --keys" 2 "$U" verify h.upd
mkdir -p revoked.d && cp keys/release.pem revoked.d/
check "verify with the key revoked (revoked.d found next to keys/)" 4 "$U" verify --keys keys h.upd
expect "revocation is explained" grep -q "revoked" err.txt
rm -r revoked.d

mkdir pax && (cd pax && tar -xf ../h.upd && tar --format=pax -cf ../pax.upd manifest.json manifest.sig payload.tar.zst)
check "a pax-format container is not canonical" 4 "$U" verify --keys keys pax.upd
(cd pax && tar --format=gnu -cf ../gnu.upd manifest.json manifest.sig payload.tar.zst)
check "a container with GNU tar's default headers is not canonical" 4 "$U" verify --keys keys gnu.upd
(cd pax && tar --format=ustar --owner=0 --group=0 --numeric-owner --mode=0644 --mtime=@0 -b1 \
   -cf ../canonical.upd manifest.json manifest.sig payload.tar.zst)
check "GNU tar with the documented options makes the canonical container" 0 "$U" verify --keys keys canonical.upd
expect "byte for byte what pack wrote" cmp h.upd canonical.upd

check "unpack" 0 "$U" unpack --keys keys h.upd out
expect "unpacked tree matches" diff -r src out
check "unpack into an existing directory" 1 "$U" unpack --keys keys h.upd out
check "unpack a tampered artifact" 4 "$U" unpack --keys keys bad.upd out2
expect "failed unpack left no destination" test ! -e out2
expect "failed unpack left no partial tree" test -z "$(ls -A | grep partial)"

/usr/bin/python3 - <<'PY'
import io, tarfile
with tarfile.open("evil.tar", "w", format=tarfile.USTAR_FORMAT) as t:
    data = b"pwned\n"
    info = tarfile.TarInfo("../evil")
    info.size = len(data)
    t.addfile(info, io.BytesIO(data))
PY
check "pack an evil payload (pack does not police payloads)" 0 "$U" pack --key release.pem --app hello --version 6.6.6 --output evil.upd --payload evil.tar
check "unpack refuses traversal with exit 3" 3 "$U" unpack --keys keys evil.upd out3
expect "nothing escaped" test ! -e evil -a ! -e "$T/../evil" -a ! -e out3

check "inspect" 0 "$U" inspect bad.upd
expect "inspect says UNVERIFIED" grep -q "UNVERIFIED" out.txt
check "inspect --json" 0 "$U" inspect --json h.upd
expect "inspect --json has verified=false" /usr/bin/python3 -c 'import json; d=json.load(open("out.txt")); assert d["verified"] is False and d["manifest"]["app"] == "hello"'
check "unknown verb" 2 "$U" frobnicate

report
