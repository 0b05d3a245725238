DROP TABLE agent_request_signatures;
DROP TABLE agent_commands;
DROP TABLE agents;
DROP TABLE enrollment_tokens;
