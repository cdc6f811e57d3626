# Stand-in for postgres:15-bookworm where no image registry is reachable: Debian's
# postgresql-15 package on the local Debian stand-in base (docker/standin-images.sh), with an
# entrypoint honouring POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB like the official image.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
# No "main" cluster from the package: the entrypoint makes the cluster in the volume.
RUN mkdir -p /etc/postgresql-common \
    && echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        -o Dpkg::Options::=--force-confold postgresql-15 \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/usr/lib/postgresql/15/bin:$PATH
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
VOLUME /var/lib/postgresql/data
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["sh", "/usr/local/bin/postgres-entrypoint.sh"]
