-- The Prefect server's database and MLflow's users database (basic auth), beside MLflow's
-- tracking database (POSTGRES_DB); same owner.
CREATE DATABASE prefect OWNER pipeline;
CREATE DATABASE mlflow_auth OWNER pipeline;
