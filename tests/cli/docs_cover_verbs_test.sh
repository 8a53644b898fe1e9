#!/usr/bin/env bash
# Every verb of upgradectl is in its man page and in its bash completion, and the man pages
# render. tests/cli/docs_cover_verbs_test.sh UPGRADECTL SOURCE_DIR MAN_DIR
set -euo pipefail
U=$1 SRC=$2 MAN=$3
verbs=$("$U" --help | sed -n '/^Subcommands:/,$p' | awk 'NR > 1 && NF {print $1}')
[ -n "$verbs" ] || { echo "FAIL: no verbs in upgradectl --help"; exit 1; }
fail=0
n=0
for v in $verbs; do
  n=$((n + 1))
  grep -q "^\*$v\*" "$SRC/docs/man/upgradectl.1.scd" ||
    grep -q "^\*[a-z]*\* _APP_ _VERSION_, \*$v\*" "$SRC/docs/man/upgradectl.1.scd" ||
    { echo "FAIL: verb '$v' is not in docs/man/upgradectl.1.scd"; fail=1; }
  grep -A1 'local verbs=' "$SRC/cli/completion/upgradectl.bash" | grep -qw "$v" ||
    { echo "FAIL: verb '$v' is not completed by cli/completion/upgradectl.bash"; fail=1; }
  grep -q "\`$v\`\|\`$v " "$SRC/docs/upgradectl.md" ||
    { echo "FAIL: verb '$v' is not in docs/upgradectl.md"; fail=1; }
done
for page in upgradectl.1 upgraded.8 upgraded.conf.5; do
  [ -s "$MAN/$page" ] || { echo "FAIL: $page was not built"; fail=1; continue; }
  if command -v man >/dev/null; then
    out=$(MANWIDTH=80 man -l "$MAN/$page" 2>&1 >/dev/null) || true
    [ -z "$out" ] || { echo "FAIL: man -l $page: $out"; fail=1; }
  fi
done
# The completion offers verbs and their options.
got=$(bash -c "
  _init_completion() { words=(\"\${COMP_WORDS[@]}\"); cword=\$COMP_CWORD; cur=\${words[cword]}; prev=\${words[cword-1]}; }
  _filedir() { :; }
  source '$SRC/cli/completion/upgradectl.bash'
  COMP_WORDS=(upgradectl ro); COMP_CWORD=1; _upgradectl; echo \"\${COMPREPLY[*]}\"
  COMP_WORDS=(upgradectl install --st); COMP_CWORD=2; _upgradectl; echo \"\${COMPREPLY[*]}\"")
[ "$got" = "$(printf 'rollback\n--stage-only')" ] || { echo "FAIL: completion gave: $got"; fail=1; }
[ $fail -eq 0 ] && echo "$n verbs documented in the man page, docs/upgradectl.md and the completion"
exit $fail
