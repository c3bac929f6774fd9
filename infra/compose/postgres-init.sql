-- The Prefect server's database, beside MLflow's (POSTGRES_DB); same owner.
CREATE DATABASE prefect OWNER pipeline;
