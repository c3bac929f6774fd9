# syntax=docker/dockerfile:1
# The MLflow tracking server for the shared services: PostgreSQL backend store, S3-compatible
# artifact store behind --artifacts-destination (clients upload through the server, so Ray
# workers need no shared disk and no S3 credentials for MLflow). Build context: infra/docker.
#
#   docker build -f infra/docker/mlflow.Dockerfile -t diffusion-mlflow-server:3.17.2 infra/docker

FROM python:3.11-slim

ARG MLFLOW_VERSION=3.17.2
# mlflow[auth]: the basic-auth app (`--app-name basic-auth`) needs Flask-WTF.
RUN pip install --no-cache-dir "mlflow[auth]==${MLFLOW_VERSION}" "psycopg2-binary==2.9.10" "boto3==1.38.36" \
 && useradd --create-home --uid 1000 mlflow
USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]
