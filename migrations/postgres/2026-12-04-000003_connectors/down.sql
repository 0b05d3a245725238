DROP TABLE connector_credentials;
DROP TABLE connectors;
