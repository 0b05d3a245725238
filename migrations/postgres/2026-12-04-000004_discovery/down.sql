DROP TABLE assets;
DROP TABLE jobs;
