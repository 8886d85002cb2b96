# Sourced by the MariaDB image's entrypoint on first start (docker-entrypoint-initdb.d), after
# the schema: creates the API's database account, which may only read lookalike's tables.
# docker_process_sql and docker_sql_escape_string_literal come from that entrypoint.

if [ -z "${API_DB_USER:-}" ] || [ -z "${API_DB_PASSWORD:-}" ]; then
	mysql_error "API_DB_USER and API_DB_PASSWORD must be set to create the API's read-only account"
fi

mysql_note "Creating read-only user ${API_DB_USER} for database ${MARIADB_DATABASE}"
docker_process_sql --database=mysql <<-EOSQL
	CREATE USER IF NOT EXISTS '$(docker_sql_escape_string_literal "${API_DB_USER}")'@'%'
		IDENTIFIED BY '$(docker_sql_escape_string_literal "${API_DB_PASSWORD}")';
	GRANT SELECT ON \`${MARIADB_DATABASE}\`.* TO '$(docker_sql_escape_string_literal "${API_DB_USER}")'@'%';
EOSQL
