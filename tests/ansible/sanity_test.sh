#!/usr/bin/env bash
# The collection upgraded.fleet (ansible/) checked offline:
# - ansible-test sanity, every test that runs without downloading anything. ansible-doc,
#   import, pep8, pylint, runtime-metadata, validate-modules and yamllint install their
#   requirements into virtual environments with pip from the network: left out here (the
#   module's documentation is rendered below instead, and the playbooks are syntax-checked);
# - ansible-doc renders the module's DOCUMENTATION, EXAMPLES and RETURN;
# - ansible-playbook --syntax-check of every playbook, with the collection's role.
#   tests/ansible/sanity_test.sh SOURCE_DIR
# Exit 77 (skipped) without ansible-core, except under CI=true.
set -euo pipefail
# ansible-* refuse a non-blocking stdin, and ctest's may be shared with tests that run ssh.
exec </dev/null
src=$(cd "$1" && pwd)
if ! command -v ansible-test >/dev/null; then
  if [ "${CI:-}" = true ]; then echo "ansible-core is not installed" >&2; exit 1; fi
  echo "ansible-core is not installed (scripts/install-deps installs it): skipped" >&2
  exit 77
fi
work=$(mktemp -d /var/tmp/upgraded-ansible-sanity.XXXXXX)
trap 'rm -rf "$work"' EXIT
# ansible-test wants the collection at .../ansible_collections/NAMESPACE/NAME.
mkdir -p "$work/ansible_collections/upgraded"
cp -r "$src/ansible" "$work/ansible_collections/upgraded/fleet"
export ANSIBLE_COLLECTIONS_PATH="$work" ANSIBLE_HOME="$work/home" ANSIBLE_NOCOLOR=1
python=$(/usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
offline_skip=(ansible-doc import pep8 pylint runtime-metadata validate-modules yamllint)
(cd "$work/ansible_collections/upgraded/fleet" &&
  ansible-test sanity --python "$python" "${offline_skip[@]/#/--skip-test=}") 2>&1 |
  grep -v 'Using locale\|Reviewing previous'
echo "ansible-test sanity: passed (offline tests; left out: ${offline_skip[*]})"

doc=$(ansible-doc upgraded.fleet.release)
for section in "OPTIONS" "EXAMPLES" "RETURN VALUES" "wait_timeout" "from_version" "downtime_ms"; do
  grep -q "$section" <<<"$doc" || { echo "ansible-doc upgraded.fleet.release: no $section" >&2; exit 1; }
done
echo "ansible-doc upgraded.fleet.release: renders"

for p in "$src"/ansible/playbooks/*.yml; do
  ansible-playbook -i localhost, --syntax-check "upgraded.fleet.$(basename "$p" .yml)" \
    -e upgraded_artifact=x.upd -e upgraded_app=x -e upgraded_from_version=1 >/dev/null
  echo "ansible-playbook --syntax-check upgraded.fleet.$(basename "$p" .yml): ok"
done
