DROP TABLE change_request_secrets;
DROP TABLE change_request_journals;
