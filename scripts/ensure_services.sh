#!/usr/bin/env bash
# Makes sure the services the tests use are present and running on this machine:
# MariaDB at 127.0.0.1:3306 (root, empty password) and Debian's Chromium for the browser tests.
set -euo pipefail

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

mariadb_ping() { mariadb-admin --host=127.0.0.1 --user=root ping >/dev/null 2>&1; }

if ! command -v mariadbd >/dev/null 2>&1 && [ ! -x /usr/sbin/mariadbd ]; then
  echo "installing MariaDB from Debian packages"
  apt_install mariadb-server mariadb-client
  fresh_install=1
fi

if ! mariadb_ping; then
  echo "starting MariaDB"
  as_root mkdir -p /run/mysqld
  as_root chown mysql:mysql /run/mysqld 2>/dev/null || true
  as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
  for _ in $(seq 1 60); do mariadb_ping && break; sleep 1; done
fi

if ! mariadb --host=127.0.0.1 --user=root -e 'SELECT 1' >/dev/null 2>&1; then
  # A fresh Debian install lets root in through the socket only; the tests log in over TCP.
  echo "allowing root with an empty password over TCP (test machine only)"
  as_root mariadb -e "ALTER USER 'root'@'localhost' IDENTIFIED VIA mysql_native_password USING PASSWORD(''); \
    CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY ''; \
    GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION; FLUSH PRIVILEGES;"
fi
mariadb --host=127.0.0.1 --user=root -e 'CREATE DATABASE IF NOT EXISTS test'
echo "MariaDB: $(mariadb --host=127.0.0.1 --user=root -N -e 'SELECT VERSION()')"

if [ ! -x /usr/bin/chromium ]; then
  echo "installing Chromium from Debian packages"
  apt_install chromium
fi
echo "Chromium: $(/usr/bin/chromium --version 2>/dev/null || echo missing)"
: "${fresh_install:=0}"
