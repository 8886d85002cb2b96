#!/usr/bin/env bash
# Installs the programs the tests need when they are missing, and nothing else: the MariaDB
# server binaries (mariadbd, mariadb-install-db and its helper my_print_defaults: Debian's
# mariadb-server-core and mariadb-client-core) and Chromium.
# It starts no server and changes no account: the tests run a throwaway MariaDB of their own.
#
#   scripts/ensure_services.sh            install what is missing, through sudo when not root
#   scripts/ensure_services.sh --no-sudo  install only when running as root; otherwise say
#                                         what is missing in one line and exit 1 (`make test`)
# With LOOKALIKE_TEST_DATABASE_URL set the tests use that server, so mariadbd is not needed.
set -euo pipefail

mode=${1:-}
case "$mode" in
  "" | --no-sudo) ;;
  *) echo "usage: $0 [--no-sudo]" >&2; exit 2 ;;
esac

# An executable file of that name on PATH or in the sbin folders, where mariadbd lives (often
# outside a non-root user's PATH). Not `command -v`: bash falls back to non-executable files.
have() {
  local dir
  local IFS=:
  for dir in $PATH /usr/sbin /usr/local/sbin; do
    if [ -f "$dir/$1" ] && [ -x "$dir/$1" ]; then return 0; fi
  done
  return 1
}

missing=()
if [ -z "${LOOKALIKE_TEST_DATABASE_URL:-}" ]; then
  # The server binaries without the system service: nothing gets started or configured.
  { have mariadbd && have mariadb-install-db; } || missing+=(mariadb-server-core)
  have my_print_defaults || missing+=(mariadb-client-core)
fi
if [ ! -x /usr/bin/chromium ]; then  # the browser tests drive Debian's Chromium
  missing+=(chromium)
fi
if [ ${#missing[@]} = 0 ]; then
  exit 0
fi

if [ "$(id -u)" = 0 ]; then
  as_root=()
elif [ "$mode" = --no-sudo ]; then
  echo "missing test programs (Debian packages: ${missing[*]}): run \`sudo make services\`" \
    "or set LOOKALIKE_TEST_DATABASE_URL to a MariaDB admin URL" >&2
  exit 1
else
  as_root=(sudo)
fi
echo "installing Debian packages for the tests: ${missing[*]} (apt-get; nothing is started)"
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq "${missing[@]}" >/dev/null
