# Sourced by the MariaDB image's entrypoint on first start (docker-entrypoint-initdb.d), after
# the schema: creates the API's writer account, which may only add and change judgements
# (and read them back: an UPDATE ... WHERE needs SELECT). No DELETE anywhere: clearing a mark
# updates it, and the audit table only grows.
# docker_process_sql and docker_sql_escape_string_literal come from that entrypoint.

if [ -z "${WRITER_DB_USER:-}" ] || [ -z "${WRITER_DB_PASSWORD:-}" ]; then
	mysql_error "WRITER_DB_USER and WRITER_DB_PASSWORD must be set to create the API's writer account"
fi

mysql_note "Creating judgement writer ${WRITER_DB_USER} for database ${MARIADB_DATABASE}"
writer="'$(docker_sql_escape_string_literal "${WRITER_DB_USER}")'@'%'"
docker_process_sql --database=mysql <<-EOSQL
	CREATE USER IF NOT EXISTS ${writer}
		IDENTIFIED BY '$(docker_sql_escape_string_literal "${WRITER_DB_PASSWORD}")';
	GRANT SELECT, INSERT, UPDATE ON \`${MARIADB_DATABASE}\`.\`judgements\` TO ${writer};
	GRANT SELECT, INSERT ON \`${MARIADB_DATABASE}\`.\`judgement_audit\` TO ${writer};
EOSQL
