# bash completion for upgradectl(1)                                     -*- shell-script -*-
# Verbs, their options, app names and versions (asked from the daemon, quietly), and files.

# Asks the daemon only if it is running: a TAB must not start it (D-Bus activation) or wait.
_upgradectl_running() {
  busctl ${1:-} --timeout=2 call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus \
    NameHasOwner s org.upgraded1 2>/dev/null | grep -q true
}

_upgradectl_apps() {
  _upgradectl_running $1 || return
  upgradectl status --json $1 2>/dev/null | sed -n 's/^ *"app": "\(.*\)",*$/\1/p'
}

_upgradectl_versions() {  # APP [--user]
  _upgradectl_running $2 || return
  upgradectl list "$1" --json $2 2>/dev/null | sed -n 's/^ *"version": "\(.*\)",*$/\1/p'
}

_upgradectl() {
  local cur prev words cword
  _init_completion || return
  local verbs="status list install plan activate rollback remove pin unpin floor finalize
    finalization-status gc jobs cancel history keygen pack verify unpack inspect"
  if [ "$cword" -eq 1 ]; then
    COMPREPLY=($(compgen -W "$verbs --help --version" -- "$cur"))
    return
  fi
  local verb=${words[1]} user=""
  [[ " ${words[*]} " == *" --user "* ]] && user=--user
  local opts
  case $verb in
    status | jobs | finalization-status) opts="--user --json" ;;
    finalize) opts="--user --no-backup --yes --no-block --quiet" ;;
    list) opts="--user --json --offline --root" ;;
    install) opts="--user --stage-only --wait --no-block --quiet --offline --root --force --wait-lock" ;;
    activate) opts="--user --through --allow-bad --allow-below-floor --no-block --quiet" ;;
    plan) opts="--user --json --rollback --through --allow-bad --allow-below-floor" ;;
    rollback) opts="--user --allow-below-floor --no-block --quiet" ;;
    remove | pin | unpin | floor) opts="--user --no-block --quiet" ;;
    gc) opts="--user --keep --max-bytes --no-block --quiet" ;;
    cancel) opts="--user --quiet" ;;
    history) opts="--user --json --limit" ;;
    keygen) opts="--private --public" ;;
    pack) opts="--key --app --version --manifest --output --payload --created --level --chunk-size --threads" ;;
    verify) opts="--keys --revoked --threshold --json" ;;
    unpack) opts="--keys --revoked --threshold --strip-unsafe-modes" ;;
    inspect) opts="--json" ;;
  esac
  case $prev in
    --root | --keys | --revoked)
      _filedir -d
      return
      ;;
    --key | --private | --public | --manifest | --output | -o | --payload)
      _filedir
      return
      ;;
    --keep | --max-bytes | --limit | -n | --threshold | --app | --version | --level | \
      --chunk-size | --created | --threads)
      return  # a value of the user's choosing
      ;;
  esac
  if [[ $cur == -* ]]; then
    COMPREPLY=($(compgen -W "$opts --help" -- "$cur"))
    return
  fi
  # Positional arguments: count the words that are not options.
  local i n=0 app=""
  for ((i = 2; i < cword; i++)); do
    [[ ${words[i]} == -* ]] && continue
    case ${words[i - 1]} in --root | --keys | --revoked | --key | --private | --public | --rollback | \
      --manifest | --output | -o | --payload | --keep | --max-bytes | --limit | -n | --threshold | \
      --created | --level | --chunk-size | --app | --version) continue ;; esac
    n=$((n + 1))
    [ $n -eq 1 ] && app=${words[i]}
  done
  case $verb in
    status | list | rollback | gc | history | floor | finalize | finalization-status)
      [ $n -eq 0 ] && COMPREPLY=($(compgen -W "$(_upgradectl_apps $user)" -- "$cur")) ;;
    activate | remove | pin | unpin)
      if [[ $verb == activate && $cur == *=* ]]; then
        # APP=VERSION... (a set): that app's releases after the "=".
        local a=${cur%%=*}
        COMPREPLY=($(compgen -P "$a=" -W "$(_upgradectl_versions "$a" $user)" -- "${cur#*=}"))
      elif [ $n -eq 0 ]; then
        COMPREPLY=($(compgen -W "$(_upgradectl_apps $user)" -- "$cur"))
      elif [ $n -eq 1 ]; then
        COMPREPLY=($(compgen -W "$(_upgradectl_versions "$app" $user)" -- "$cur"))
      fi
      ;;
    plan)
      # APP=VERSION: the apps, then that app's releases after the "=".
      if [[ $prev == --rollback ]]; then
        COMPREPLY=($(compgen -W "$(_upgradectl_apps $user)" -- "$cur"))
      elif [[ $cur == *=* ]]; then
        local a=${cur%%=*}
        COMPREPLY=($(compgen -P "$a=" -W "$(_upgradectl_versions "$a" $user)" -- "${cur#*=}"))
      elif [[ $cur == */* || $cur == .* ]]; then
        _filedir '@(upd)'
      else
        # Installed apps (APP=VERSION), and artifact files.
        COMPREPLY=($(compgen -S = -W "$(_upgradectl_apps $user)" -- "$cur"))
        compopt -o nospace
        local files=($(compgen -f -X '!*.upd' -- "$cur"))
        COMPREPLY+=("${files[@]}")
      fi
      ;;
    install | verify | inspect | unpack) _filedir '@(upd)' ;;
    pack) _filedir -d ;;
  esac
}
complete -F _upgradectl upgradectl
