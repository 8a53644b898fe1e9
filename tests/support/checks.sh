# Shared by the shell tests (tests/cli/*_test.sh), sourced from their working directory:
# check and expect count what passed and failed, and report() ends the test with its tally.

passed=0
failed=0

check() {  # check NAME EXPECTED_RC COMMAND...: runs it, its output in out.txt and err.txt
  local name=$1 want=$2
  shift 2
  "$@" >out.txt 2>err.txt
  local rc=$?
  if [ "$rc" -eq "$want" ]; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    echo "FAIL: $name: exit $rc, expected $want"
    sed 's/^/  stdout: /' out.txt | head -5
    sed 's/^/  stderr: /' err.txt | head -5
  fi
}

expect() {  # expect NAME CONDITION...
  local name=$1
  shift
  if "$@"; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "FAIL: $name"; fi
}

report() {  # report [WHAT]: the tally; exits non-zero if anything failed
  echo "${1:+$1: }$passed passed, $failed failed"
  [ "$failed" -eq 0 ]
}
